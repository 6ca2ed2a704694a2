"""Trainer: epochs that may stop partway through (LWIQ's fractional warm-up) and resume."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ranksearch.models.trainer import Trainer


class Task:
    """Ten batches per epoch of generated data, in an order fixed by the epoch; records which
    (epoch, batch) each training step saw."""

    def __init__(self, sized: bool):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(100, 4, generator=g), torch.randint(0, 3, (100,), generator=g)
        self.sized, self.seen = sized, []

    def train_batches(self, epoch):
        order = torch.randperm(100, generator=torch.Generator().manual_seed(epoch))
        batches = [(epoch, i, self.x[idx], self.y[idx]) for i, idx in enumerate(order.split(10))]
        return batches if self.sized else iter(batches)

    def loss(self, net, batch):
        epoch, i, x, y = batch
        self.seen.append((epoch, i))
        return F.cross_entropy(net(x), y)

    def validate(self, net):
        return {"accuracy": 0.0}


@pytest.mark.parametrize("sized", [True, False])
def test_a_fraction_of_an_epoch_stops_partway_and_the_next_run_resumes_it(sized):
    task, rows = Task(sized), []
    cfg = {"epochs": 2, "finetune_epochs": 0, "lr": 1e-2, "optimizer": "adam", "weight_decay": 0.0,
           "schedule": "cosine", "table_optimizer": "none"}
    trainer = Trainer(nn.Linear(4, 3), task, cfg, rows.append, progress=False)
    trainer.run(0.25, "search")  # 2.5 batches: rounded to 2
    assert task.seen == [(0, 0), (0, 1)] and rows == [] and trainer.epoch == 0
    trainer.run(1.75, "train")  # the rest of epoch 0, then all of epoch 1: 2 epochs in all
    assert task.seen == [(0, i) for i in range(10)] + [(1, i) for i in range(10)]
    assert [(r["epoch"], r["phase"]) for r in rows] == [(1, "train"), (2, "train")]  # each epoch reported once
    trainer.run(0.04, "train")  # under half a batch: nothing to train
    assert len(task.seen) == 20 and trainer.epoch == 2
