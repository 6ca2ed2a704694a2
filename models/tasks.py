"""What `fit` trains on: batches, a loss and metrics, independent of the method.

A task hides whether the model is an image classifier or a recommender, so the
training loop and every rank-selection method work unchanged on both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ClassificationTask:
    """Image classification: cross-entropy, accuracy. 10 % of the training set is held
    out (deterministically) for per-epoch validation and for LWIQ's measurement."""

    primary_metric = "accuracy"

    def __init__(self, data, *, batch_size: int, seed: int, device: torch.device, val_fraction: float = 0.1):
        self.data, self.batch_size, self.device = data, batch_size, device
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(data.y_train), generator=generator)
        n_val = max(1, int(len(order) * val_fraction))
        self.val_idx, self.train_idx = order[:n_val], order[n_val:]
        self.seed = seed

    def model_kwargs(self) -> dict:
        return {"input_shape": tuple(self.data.input_shape), "num_classes": int(self.data.num_classes)}

    def _batches(self, x, y, idx, shuffle_seed=None):
        if shuffle_seed is not None:
            idx = idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(shuffle_seed))]
        for start in range(0, len(idx), self.batch_size):
            b = idx[start : start + self.batch_size]
            yield x[b].to(self.device), y[b].to(self.device)

    def train_batches(self, epoch: int):
        return self._batches(self.data.x_train, self.data.y_train, self.train_idx, shuffle_seed=self.seed * 1000 + epoch)

    def heldout_batches(self):
        return self._batches(self.data.x_train, self.data.y_train, self.val_idx)

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y)

    @torch.no_grad()
    def _accuracy(self, model, batches) -> dict:
        was_training = model.training
        model.eval()
        correct = total = 0
        for x, y in batches:
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
        model.train(was_training)
        return {"accuracy": correct / max(total, 1)}

    def validate(self, model: nn.Module) -> dict:
        return self._accuracy(model, self.heldout_batches())

    def evaluate(self, model: nn.Module) -> dict:
        n = len(self.data.y_test)
        return self._accuracy(model, self._batches(self.data.x_test, self.data.y_test, torch.arange(n)))
