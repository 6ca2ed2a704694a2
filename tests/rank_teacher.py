"""Teacher-student data with known ranks, and a training loop that follows base.py's lifecycle.

A teacher is a FactorizedLinear built directly at the ranks to recover (every
slice kept, so its full weight has exactly those ranks for generic factors); a
student is the same layer at a larger max rank. Shared by the rank-selection tests.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from models.rank_selection import RankMethod
from models.tensorized import FactorizedLinear


def make_teacher(format: str, ranks, in_features: int, out_features: int, seed: int = 0,
                 **shape_kw) -> FactorizedLinear:
    """A layer of exactly `ranks` (one per rank edge) whose outputs have unit-order scale for
    standard normal inputs. `shape_kw` (in_shape, out_shape) fixes the tensorization."""
    torch.manual_seed(seed)
    teacher = FactorizedLinear(in_features, out_features, format=format, max_rank=list(ranks), **shape_kw)
    teacher.reset_parameters(std=1 / math.sqrt(in_features))
    return teacher.eval()


def make_student(teacher: FactorizedLinear, max_rank, seed: int = 1) -> FactorizedLinear:
    """A fresh layer with the teacher's shapes at `max_rank`."""
    torch.manual_seed(seed)
    config = {**teacher.config(), "max_rank": max_rank}
    return FactorizedLinear(**config)


@torch.no_grad()
def teacher_data(teacher, n: int, seed: int = 0, *, noise: float = 0.01, classify: bool = False):
    """(x, y) with x ~ N(0, I): y = teacher(x) + noise (regression), or argmax teacher(x) as
    class labels (classification)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, teacher.in_features, generator=g)
    out = teacher(x)
    if classify:
        return x, out.argmax(dim=1)
    return x, out + noise * torch.randn(out.shape, generator=g)


def batches(data, batch_size: int, seed: int | None = None):
    """Mini-batches of (x, y), shuffled when a seed is given."""
    x, y = data
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)) if seed is not None \
        else torch.arange(len(x))
    return [(x[idx], y[idx]) for idx in order.split(batch_size)]


def task_loss(output, target):
    return F.cross_entropy(output, target) if target.dtype == torch.long else F.mse_loss(output, target)


def train(model, method: RankMethod, data, epochs: int, lr: float, *, batch_size: int = 64,
          held_out=None, target_params: int | None = None, seed: int = 0) -> RankMethod:
    """Attach, search for `method.search_epochs(epochs)` epochs (task loss + penalty, Adam on the
    model and the method's own groups, `step` after every optimizer step, `end_epoch`), then
    `measure` on held-out batches (default: the training data). Selection is left to the caller."""
    torch.manual_seed(seed)
    method.attach(model)
    if target_params is not None:
        method.target_params = target_params
    optimizer = torch.optim.Adam([{"params": list(model.parameters()), "lr": lr}, *method.param_groups(lr)])
    model.train()
    for epoch in range(method.search_epochs(epochs)):
        for b, (x, y) in enumerate(batches(data, batch_size, seed=seed * 1000 + epoch)):
            loss = task_loss(model(x), y) + method.penalty()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            method.step(epoch, b)
        method.end_epoch(epoch)
    model.eval()
    method.measure(model, batches(held_out if held_out is not None else data, 256))
    return method


def compress(model, method: RankMethod, budget_params: int) -> dict[str, list[int]]:
    """select -> detach -> prune, as fit does after the search; returns the ranks per layer."""
    ranks = method.select(budget_params)
    method.detach()
    for layer in method.layers.values():
        layer.prune()
    return ranks
