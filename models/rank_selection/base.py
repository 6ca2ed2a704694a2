"""The one interface every rank-selection method implements, and budget arithmetic.

A method attaches to a model's factorized layers from the outside (hooks on
their `FactorizedTensor`s, its own parameters in its own module), adds a
penalty to the loss, updates itself after optimizer steps, and finally
`select(budget)` leaves masks that keep the model at or under the budget.
`fit` drives every method the same way:

    method.attach(model)            # after tensorize, before the optimizer is built
    for epoch in range(method.search_epochs(epochs)):
        loss = task_loss + method.penalty();  ...; optimizer.step(); method.step(epoch, batch)
        method.end_epoch(epoch)
    method.measure(model, held_out_batches)
    method.select(budget_params)    # masks set, total <= budget (or BudgetError)
    method.detach()                 # hooks removed, function unchanged
    layer.prune() for every layer   # factors physically shrink
    ... the remaining epochs and the fine-tune train the pruned model without the method
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from ranksearch.models.tensorized import FactorizedLayer, factorized_layers


class BudgetError(ValueError):
    """The budget cannot be met (even rank 1 on every edge is larger)."""


def tensorized_params(layers: Mapping[str, FactorizedLayer], effective: bool = True) -> int:
    return sum(layer.num_parameters(effective) for layer in layers.values())


def tensorized_dense_params(layers: Mapping[str, FactorizedLayer]) -> int:
    return sum(layer.dense_parameters() for layer in layers.values())


def resolve_budget(budget, layers: Mapping[str, FactorizedLayer]) -> int:
    """Budget in parameters of the tensorized layers: a fraction in (0, 1] of their dense
    count, or an absolute integer count >= 1."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise BudgetError(f"budget: expected a fraction in (0, 1] or a parameter count >= 1, got {budget!r}")
    if isinstance(budget, float):
        if not 0 < budget <= 1:
            raise BudgetError(f"budget: fraction {budget} is outside (0, 1]; give an int for an absolute count")
        return int(budget * tensorized_dense_params(layers))
    if budget < 1:
        raise BudgetError(f"budget: absolute parameter count must be >= 1, got {budget}")
    return int(budget)


def minimum_params(layers: Mapping[str, FactorizedLayer]) -> int:
    """Parameters with one slice kept on every edge (the smallest any method can reach)."""
    return sum(layer.params_at([1] * layer.weight.num_edges) for layer in layers.values())


def check_budget_floor(layers: Mapping[str, FactorizedLayer], budget_params: int) -> None:
    """BudgetError when even rank 1 on every edge is over the budget."""
    floor = minimum_params(layers)
    if budget_params < floor:
        raise BudgetError(
            f"budget: {budget_params} parameters is below the minimum {floor} (rank 1 on every edge of "
            f"{len(layers)} tensorized layers)"
        )


@torch.no_grad()
def prune_to_budget(layers: Mapping[str, FactorizedLayer], importance: Mapping[str, list[torch.Tensor]],
                    budget_params: int) -> None:
    """Drop the least important kept slices, one at a time across all layers, until the
    tensorized layers fit `budget_params`. `importance[layer][edge]` scores each slice
    (higher = keep); scores must be comparable across layers. Each edge keeps >= 1 slice.
    """
    check_budget_floor(layers, budget_params)
    candidates = []  # (score, layer, edge, index)
    for name, layer in layers.items():
        for edge, scores in enumerate(importance[name]):
            mask = layer.weight.mask(edge)
            for i in torch.nonzero(mask != 0).flatten().tolist():
                candidates.append((float(scores[i]), name, edge, i))
    candidates.sort(key=lambda c: c[0])
    total = tensorized_params(layers)
    for _, name, edge, i in candidates:
        if total <= budget_params:
            break
        layer = layers[name]
        mask = layer.weight.mask(edge)
        if int((mask != 0).sum()) <= 1:
            continue
        before = layer.num_parameters()
        mask[i] = 0
        total += layer.num_parameters() - before
    if total > budget_params:  # only rank-1 edges left on the scored order: unreachable given the floor check
        raise BudgetError(f"budget: could not reach {budget_params} parameters (at {total})")


class RankMethod(nn.Module):
    """Base class: subclasses set `name`, implement `_attach` and `importance`, and may
    override `penalty`, `step`, `end_epoch`, `natural_masks`, `select`, `_detach`, `state`."""

    name = ""

    def __init__(self, **hyperparameters):
        super().__init__()
        self.hp = dict(hyperparameters)
        fraction = self.hp.get("search_fraction", 1.0)
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise ValueError(f"search_fraction: expected a fraction in (0, 1], got {fraction!r}")
        self.layers: dict[str, FactorizedLayer] = {}

    # -- lifecycle -----------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        self.layers = factorized_layers(model)
        if not self.layers:
            raise ValueError("model: has no factorized layers to select ranks for (was it tensorized?)")
        self._attach()

    def _attach(self) -> None:
        raise NotImplementedError

    def detach(self) -> None:
        """Remove hooks; what the model computes in eval mode is unchanged."""
        for layer in self.layers.values():
            layer.weight.fold_gates()
            layer.weight.factor_sampler = None

    # -- training ------------------------------------------------------------------------
    def penalty(self) -> torch.Tensor:
        """Added to the mean task loss of each batch."""
        return torch.zeros(())

    def step(self, epoch: int, batch: int) -> None:
        """After each optimizer step."""

    def end_epoch(self, epoch: int) -> None:
        """After each training epoch."""

    def search_epochs(self, epochs: int) -> int:
        """How many of the training epochs run with the method attached (the rank search):
        `search_fraction` of them (all when the method has none), at least one."""
        return min(epochs, max(1, round(epochs * self.hp.get("search_fraction", 1.0))))

    def measure(self, model: nn.Module, batches) -> None:
        """Called once after the search epochs with held-out (x, y) batches (LWIQ measures here)."""

    def param_groups(self, lr: float) -> list[dict]:
        """Optimizer groups for the method's own parameters (gates, posterior scales)."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": params, "lr": lr}] if params else []

    # -- selection -----------------------------------------------------------------------
    def importance(self) -> dict[str, list[torch.Tensor]]:
        """Per layer, per edge: a score per slice, comparable across layers (higher = keep)."""
        raise NotImplementedError

    def natural_masks(self) -> dict[str, list[torch.Tensor]] | None:
        """Slices the method itself has switched off (e.g. lambda below threshold), or None."""
        return None

    @torch.no_grad()
    def select(self, budget_params: int) -> dict[str, list[int]]:
        """Set masks: the method's own choice, then least-important slices dropped until the
        budget holds. Returns ranks per layer."""
        natural = self.natural_masks() or {}
        importance = self.importance()
        for name, keeps in natural.items():
            weight = self.layers[name].weight
            for edge, keep in enumerate(keeps):
                keep = keep.to(torch.bool) & (weight.mask(edge) != 0)
                if not keep.any():  # the method dropped every slice: keep its best one
                    keep[int(torch.argmax(importance[name][edge]))] = True
                weight.set_mask(edge, keep)
        prune_to_budget(self.layers, importance, budget_params)
        return {name: layer.ranks for name, layer in self.layers.items()}

    def state(self) -> dict:
        """JSON-able summary for the run record."""
        return {}
