"""`Trainer`: the epochs of one run. It builds a fresh optimizer per phase (pruning replaces
parameters), reports each epoch's validation row, and stops a diverged run with a clear error.
`fit` (train.py) decides the phases; models.distributed subclasses this for sharded training."""

from __future__ import annotations

import itertools
import math
import sys
import time
from typing import Callable

import numpy as np
import torch
from torch import nn

from ranksearch.models.tensorized import model_params
from ranksearch.models.tensorized.table_optim import make_table_optimizer


class Trainer:
    """Runs epochs, builds a fresh optimizer per phase (pruning replaces parameters),
    reports each epoch, and stops a diverged run with a clear error."""

    def __init__(self, net: nn.Module, task, cfg: dict, on_epoch: Callable[[dict], None] | None, progress: bool):
        self.net, self.task, self.cfg = net, task, cfg
        self.on_epoch, self.progress = on_epoch, progress
        self.epoch = 0  # completed epochs
        # a run may stop partway through an epoch (LWIQ's fractional warm-up): the next run resumes it
        self._target = 0.0  # epochs asked for so far, over all runs
        self._offset = 0  # batches of the current epoch already trained
        self._epoch_losses: list[float] = []
        self._epoch_seconds = 0.0
        self._length: int | None = None  # batches per epoch, counted when a fraction needs it
        self.report_seconds = 0.0  # spent validating for the epoch rows (not training: rank-search time leaves it out)
        self.total_epochs = cfg["epochs"] + cfg["finetune_epochs"]
        self.restart_schedule(self.total_epochs)

    def restart_schedule(self, span: int) -> None:
        """Cosine from the full lr over the next `span` epochs. fit restarts it after pruning:
        a pruned model must re-train at full lr, not at the tail of the search's schedule."""
        self.schedule_start, self.schedule_span = self.epoch, max(span, 1)

    def _table_optimizer(self):
        """The fused sparse table optimizer of this phase (train.table_optimizer), or None. Its
        parameters never get a .grad, so the dense optimizer below skips them."""
        name = self.cfg.get("table_optimizer", "none")
        if name == "auto":
            name = getattr(self.net, "default_table_optimizer", "none")
        return None if name == "none" else make_table_optimizer(name, self.cfg["table_lr"]).attach(self.net)

    def _optimizer(self, method, lr: float):
        groups = [{"params": [p for p in self.net.parameters() if p.requires_grad], "lr": lr}]
        if method is not None:
            groups += method.param_groups(lr)
        if self.cfg["optimizer"] == "sgd":
            return torch.optim.SGD(groups, lr=lr, momentum=self.cfg["momentum"], weight_decay=self.cfg["weight_decay"])
        return torch.optim.Adam(groups, lr=lr, weight_decay=self.cfg["weight_decay"])

    def _lr(self, epoch: int) -> float:
        if self.cfg["schedule"] == "none" or self.schedule_span <= 1:
            return self.cfg["lr"]
        return self.cfg["lr"] * 0.5 * (1 + math.cos(math.pi * (epoch - self.schedule_start) / self.schedule_span))

    def run(self, epochs: float, phase: str, method=None) -> None:
        """Train `epochs` more epochs. A fraction ends partway through an epoch (rounded to whole
        batches); the next run resumes that epoch on the same batch order, so the epochs of all
        runs add up. An epoch is reported once, when it completes."""
        if epochs <= 0:
            return
        self._target += epochs
        optimizer = self._optimizer(method, self._lr(self.epoch))
        tables = self._table_optimizer()
        try:
            self._epochs(phase, method, optimizer, tables)
        finally:
            if tables is not None:
                tables.detach()

    def _epoch_length(self) -> int:
        if self._length is None:
            batches = self.task.train_batches(self.epoch)
            self._length = len(batches) if hasattr(batches, "__len__") else sum(1 for _ in batches)
        return self._length

    def _epochs(self, phase: str, method, optimizer, tables) -> None:
        while self._target - self.epoch > 1e-9:
            part = self._target - self.epoch  # None below: to the end of the epoch
            stop = None if part > 1 - 1e-9 else min(round(part * self._epoch_length()), self._epoch_length())
            if stop is not None and stop <= self._offset:
                return
            scale = self._lr(self.epoch) / self.cfg["lr"]
            for group in optimizer.param_groups:
                group.setdefault("base_lr", group["lr"])
                group["lr"] = group["base_lr"] * scale
            if tables is not None:
                tables.lr = self.cfg["table_lr"] * scale
            self.net.train()
            start = time.perf_counter()
            batches = itertools.islice(self.task.train_batches(self.epoch), self._offset, stop)
            for b, batch in enumerate(batches, start=self._offset):
                loss = self.task.loss(self.net, batch)
                if method is not None:
                    loss = loss + method.penalty()
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"training diverged: loss is {float(loss)} at epoch {self.epoch + 1}, batch {b}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if method is not None:
                    method.step(self.epoch, b)
                self._epoch_losses.append(float(loss.detach()))
            self._epoch_seconds += time.perf_counter() - start
            if stop is not None and stop < self._epoch_length():
                self._offset = stop
                return
            if method is not None:
                method.end_epoch(self.epoch)
            self.epoch += 1
            losses, seconds = self._epoch_losses, self._epoch_seconds
            self._offset, self._epoch_losses, self._epoch_seconds = 0, [], 0.0
            reporting = time.perf_counter()
            self._report(phase, float(np.mean(losses)) if losses else float("nan"), seconds)
            self.report_seconds += time.perf_counter() - reporting

    def _params(self) -> int:
        return model_params(self.net)

    def _report(self, phase: str, loss: float, seconds: float) -> None:
        metrics = {f"val_{k}": v for k, v in self.task.validate(self.net).items()}
        row = {"epoch": self.epoch, "phase": phase, "loss": loss, **metrics, "params": self._params(),
               "epoch_time_s": seconds}
        if self.progress:
            shown = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())
            print(f"[{self.epoch}/{self.total_epochs}] {shown}", file=sys.stderr, flush=True)
        if self.on_epoch is not None:
            self.on_epoch(row)
