"""Budget arithmetic, in one place: what a budget means in parameters, the smallest model a
method can reach, the uniform rank that fits, and pruning to a budget by importance.

A budget is a fraction in (0, 1] of the dense parameter count of the tensorized layers, or an
absolute count of their parameters. Every method and baseline gets it resolved once
(`resolve_budget`) and ends at or under it.
"""

from __future__ import annotations

from typing import Mapping

import torch

from ranksearch.models.tensorized import FactorizedLayer


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
                    budget_params: int, *, cost_power: float = 0.0, cost_scope: str = "layer") -> None:
    """Drop kept slices, one at a time across all layers, until the tensorized layers fit
    `budget_params`. `importance[layer][edge]` scores each slice (higher = keep, > 0 when
    `cost_power` > 0); scores must be comparable across layers. Each edge keeps >= 1 slice.

    cost_power 0: the least important slice goes first. cost_power p > 0 (greedy, recomputed as
    cores shrink, since a slice of an edge between two large cores frees 10-100x more than one of a
    small core): the next slice dropped has the lowest importance / saved**p, `saved` being the
    parameters its removal frees at the current ranks — compared across layers only
    (`cost_scope` "layer": within a layer the least important slice is its candidate) or across
    every edge ("edge"). Per edge, cost decided too much: slices of one saturated edge score
    alike, so the most expensive edge of an MLP's TTM layer fell to rank 1 and accuracy by 3
    points (MNIST, 1 % budget; README).
    """
    if cost_scope not in COST_SCOPES:
        raise ValueError(f"cost_scope: expected one of {', '.join(COST_SCOPES)}, got {cost_scope!r}")
    check_budget_floor(layers, budget_params)
    total = tensorized_params(layers)
    if cost_power == 0:
        _prune_by_importance(layers, importance, budget_params, total)
        return
    while total > budget_params:
        best = None  # (score, layer, edge, index, saved)
        for name, layer in layers.items():
            for score, edge, i, saved in _candidates(layer, importance[name], cost_scope):
                score = score / max(saved, 1) ** cost_power
                if best is None or score < best[0]:
                    best = (score, name, edge, i, saved)
        if best is None:  # every edge at rank 1: unreachable given the floor check
            raise BudgetError(f"budget: could not reach {budget_params} parameters (at {total})")
        _, name, edge, i, saved = best
        layers[name].weight.mask(edge)[i] = 0
        total -= saved


COST_SCOPES = ("layer", "edge")


def _candidates(layer: FactorizedLayer, scores: list[torch.Tensor], scope: str):
    """(importance, edge, index, parameters saved) of the least important kept slice of each edge
    that can lose one ("edge"), or only the least important of them all ("layer")."""
    ranks = layer.ranks
    now = layer.params_at(ranks)
    out = []
    for edge, edge_scores in enumerate(scores):
        if ranks[edge] <= 1:
            continue
        kept = torch.nonzero(layer.weight.mask(edge) != 0).flatten()
        i = int(kept[torch.argmin(edge_scores[kept])])
        out.append((float(edge_scores[i]), edge, i, None))
    if scope == "layer" and out:
        out = [min(out)]
    return [(s, e, i, now - layer.params_at([r - (k == e) for k, r in enumerate(ranks)])) for s, e, i, _ in out]


def _prune_by_importance(layers, importance, budget_params: int, total: int) -> None:
    candidates = []  # (score, layer, edge, index)
    for name, layer in layers.items():
        for edge, scores in enumerate(importance[name]):
            mask = layer.weight.mask(edge)
            for i in torch.nonzero(mask != 0).flatten().tolist():
                candidates.append((float(scores[i]), name, edge, i))
    candidates.sort(key=lambda c: c[0])
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


def uniform_rank_for_budget(layers: dict, budget_params: int) -> int:
    """The largest rank r (on every edge, capped at each edge's max) whose layers fit the budget."""
    check_budget_floor(layers, budget_params)
    best = 1
    for r in range(2, max(max(layer.max_ranks) for layer in layers.values()) + 1):
        if sum(layer.params_at([min(r, m) for m in layer.max_ranks]) for layer in layers.values()) > budget_params:
            break
        best = r
    return best
