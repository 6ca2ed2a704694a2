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


def _call(model: nn.Module, x):
    """The model on a batch's inputs: a tensor as one argument, a tuple/list as positional
    arguments, a dict as keyword arguments."""
    if isinstance(x, dict):
        return model(**x)
    if isinstance(x, (tuple, list)):
        return model(*x)
    return model(x)


def _pair(batch, what: str):
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise ValueError(f"{what}: expected (inputs, targets) batches, got {type(batch).__name__}; "
                         "pass step=callable(model, batch) -> loss (and a metric) for other batches")
    return batch


@torch.no_grad()
def accuracy(model: nn.Module, batches) -> float:
    """Top-1 accuracy over (x, y) batches: the default metric."""
    correct = total = 0
    for batch in batches:
        x, y = _pair(batch, "metric")
        correct += int((_call(model, x).argmax(-1) == y).sum())
        total += int(y.numel())
    return correct / max(total, 1)


class BatchTask:
    """The user's own data: re-iterable train / validation batches (models.data.loaders.Batches),
    a loss on (outputs, targets) or a `step(model, batch) -> loss`, and a metric
    `metric(model, batches) -> float` named `metric_name`, better when `metric_mode` says."""

    def __init__(self, train, val, *, device: torch.device, loss=None, metric=None, metric_name=None,
                 metric_mode="max", step=None, test=None):
        from ranksearch.models.data.loaders import Batches

        self.train, self.val = Batches(train, "train_data"), Batches(val, "val_data")
        self.test = Batches(test, "test_data") if test is not None else None
        self.device, self._loss, self._step = device, loss or F.cross_entropy, step
        self._metric = metric or accuracy
        self.primary_metric = metric_name or getattr(self._metric, "__name__", "metric")
        if metric_mode not in ("max", "min"):
            raise ValueError(f"metric_mode: expected 'max' or 'min', got {metric_mode!r}")
        self.metric_mode = metric_mode

    def _moved(self, batches):
        from ranksearch.models.data.loaders import to_device

        return (to_device(b, self.device) for b in batches)

    def train_batches(self, epoch: int):
        return self._moved(self.train)

    def heldout_batches(self):
        return self._moved(self.val)

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        if self._step is not None:
            return self._step(model, batch)
        x, y = _pair(batch, "train_data")
        return self._loss(_call(model, x), y)

    def _score(self, model: nn.Module, batches) -> dict:
        was_training = model.training
        model.eval()
        try:
            value = self._metric(model, batches)
        finally:
            model.train(was_training)
        return {self.primary_metric: float(value)}

    def validate(self, model: nn.Module) -> dict:
        return self._score(model, self.heldout_batches())

    def evaluate(self, model: nn.Module) -> dict:
        """On the test batches when there are any, else on the validation batches."""
        return self._score(model, self._moved(self.test) if self.test is not None else self.heldout_batches())


def task_options(task) -> dict:
    """A user task (a class is instantiated without arguments) as `compress` keyword arguments:
    any of `loss(outputs, targets)`, `metric(model, batches)`, `step(model, batch)`,
    `metric_name`, `metric_mode`."""
    if isinstance(task, type):
        task = task()
    options = {key: getattr(task, key, None) for key in ("loss", "metric", "step")}
    for key, value in options.items():
        if value is not None and not callable(value):
            raise ValueError(f"task.{key}: expected a callable, got {type(value).__name__}")
    if not any(options.values()):
        raise ValueError("task: defines none of loss, metric, step")
    options["metric_name"] = getattr(task, "metric_name", None) or (
        getattr(options["metric"], "__name__", None) if options["metric"] is not None else "accuracy")
    options["metric_mode"] = getattr(task, "metric_mode", "max")
    if options["metric_mode"] not in ("max", "min"):
        raise ValueError(f"task.metric_mode: expected 'max' or 'min', got {options['metric_mode']!r}")
    return options
