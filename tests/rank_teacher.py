"""Teacher-student data with known ranks, and a training loop that follows base.py's lifecycle.

A teacher is a FactorizedLinear built directly at the ranks to recover, with
balanced slices (every edge has a flat spectrum); a student is the same layer at
a larger max rank. Shared by the rank-selection tests.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ranksearch.models.rank_selection import BudgetError, RankMethod
from ranksearch.models.rank_selection.budget import minimum_params, resolve_budget, tensorized_params
from ranksearch.models.tensorized import FactorizedLinear


@torch.no_grad()
def _balance(weight, sweeps: int = 30) -> None:
    """Give every factor's unfolding along each of its edges orthonormal rows (alternating polar
    projections): each edge then has a flat spectrum, so every slice of the teacher matters as
    much as the others and its ranks are unambiguous rather than numerically blurred."""
    for _ in range(sweeps):
        for factor, labels in zip(weight.factors, weight.labels):
            for d, (kind, _) in enumerate(labels):
                if kind == "edge":
                    moved = factor.movedim(d, 0)
                    u, _, vh = torch.linalg.svd(moved.reshape(moved.shape[0], -1), full_matrices=False)
                    factor.copy_((u @ vh).reshape(moved.shape).movedim(0, d))


def make_teacher(format: str, ranks, in_features: int, out_features: int, seed: int = 0,
                 **shape_kw) -> FactorizedLinear:
    """A layer of exactly `ranks` (one per rank edge, each no larger than its edge allows), with
    balanced slices and weights of std 1/sqrt(in_features), so outputs have unit scale for
    standard normal inputs. `shape_kw` (in_shape, out_shape) fixes the tensorization."""
    torch.manual_seed(seed)
    teacher = FactorizedLinear(in_features, out_features, format=format, max_rank=list(ranks), **shape_kw)
    _balance(teacher.weight)
    with torch.no_grad():
        scale = (1 / math.sqrt(in_features) / teacher.dense_weight().std()) ** (1 / len(teacher.weight.factors))
        for factor in teacher.weight.factors:
            factor.mul_(scale)
    return teacher.eval()


def make_student(teacher: FactorizedLinear, max_rank, seed: int = 1) -> FactorizedLinear:
    """A fresh layer with the teacher's shapes at `max_rank`."""
    torch.manual_seed(seed)
    config = {**teacher.config(), "max_rank": max_rank}
    return FactorizedLinear(**config)


# Small cases whose every edge can hold rank 8: format -> (in_shape = out_shape, teacher ranks)
CASES = {"ttm": ([3, 3, 3], [2, 3]), "tt": ([4, 4], [2, 3, 2]), "cp": ([6, 6], [3])}


def teacher_student(format: str, seed: int = 0, max_rank: int = 8):
    """The teacher of CASES[format] and a fresh student at `max_rank`."""
    shape, ranks = CASES[format]
    size = math.prod(shape)
    teacher = make_teacher(format, ranks, size, size, seed=seed, in_shape=shape, out_shape=shape)
    return teacher, make_student(teacher, max_rank, seed=seed + 1)


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
          held_out=None, budget_params: int | None = None, seed: int = 0, plan: bool = False) -> RankMethod:
    """Attach, search for `epochs` epochs — the whole run is the rank search (task loss + penalty, Adam on the
    model and the method's own groups, `step` after every optimizer step, `end_epoch`), then
    `measure` on held-out batches (default: the training data). Selection is left to the caller.
    `plan`: tell the method the search is `epochs` long, as fit does (budget-aware cuts need it).
    Runs on one thread: on tensors this small, more threads only wait on each other (and on a
    busy machine they can make a step ten times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if plan:
            method.search_epochs(epochs)
        return _train(model, method, data, epochs, lr, batch_size, held_out, budget_params, seed)
    finally:
        torch.set_num_threads(threads)


def _train(model, method, data, epochs, lr, batch_size, held_out, budget_params, seed):
    torch.manual_seed(seed)
    method.attach(model, budget_params)
    optimizer = torch.optim.Adam([{"params": list(model.parameters()), "lr": lr}, *method.param_groups(lr)])
    model.train()
    for epoch in range(epochs):
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


@torch.no_grad()
def fresh_masks(method: RankMethod) -> None:
    """Every slice kept again, so `select` can be tried at another budget."""
    for layer in method.layers.values():
        for mask in layer.rank_masks:
            mask.fill_(1)


def compress(model, method: RankMethod, budget_params: int) -> dict[str, list[int]]:
    """select -> detach -> prune, as fit does after the search; returns the ranks per layer."""
    ranks = method.select(budget_params)
    method.detach()
    for layer in method.layers.values():
        layer.prune()
    return ranks


def check_select_meets_budget(method: RankMethod, budget: str) -> None:
    """`select` from fresh masks ends at or under the budget: "fraction" is 30 % of the dense
    count, "tight" a count below what the natural masks keep, so importance decides."""
    fresh_masks(method)
    budget = resolve_budget(0.3, method.layers) if budget == "fraction" else minimum_params(method.layers) + 20
    ranks = method.select(budget)[""]
    assert tensorized_params(method.layers) <= budget
    assert all(r >= 1 for r in ranks)


def check_impossible_budget_is_a_clear_error(method: RankMethod) -> None:
    floor = minimum_params(method.layers)
    with pytest.raises(BudgetError, match=f"below the minimum {floor}"):
        method.select(floor - 1)
