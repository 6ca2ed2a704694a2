"""Probabilistic L0 rank selection (Cao et al., IJCAI 2024): a stochastic gate per rank slice.

Each slice r of each edge has a gate, a diagonal matrix between the factors the edge joins
(applied through `slice_gates`, so it keeps or drops the slice in both neighbours). Gates are
the STG relaxation of Bernoulli variables (Yamada et al., ICML 2020):
z = clip(μ + shift + σε, 0, 1), ε ~ N(0, 1) in training and 0 at evaluation; μ starts at 0 so,
with shift 1.2, every gate starts open. P(z > 0) = Φ((μ + shift)/σ). On each edge the gate with
the highest μ is held at 1, so no rank reaches 0.

Penalty (our normalization): lam · E[weight parameters] / (weight parameters at max rank), with
E[rank_e] = Σ_r P(z_r > 0). The paper penalizes the count of open gates (its code: the mean over
each edge, summed over edges); weighting every slice by the parameters it carries makes the
penalty the relaxed budget itself, comparable across layers and models. Gates are independent
and a factor holds an edge once, so the expectation is exact: per factor, a product of expected
ranks and mode sizes.

Budget-aware search (`budget_aware`, the default; schedule.py): gradual cuts by importance from
`cut_start` to `cut_end` of the search; slices whose gates closed below the budget come back at
`select`, most important first (base.select). Optionally (`dual_lr` > 0; default 0) a Lagrange
multiplier ν on the expected parameter count (constrained L0, Louizos et al. 2018): the penalty
weight is lam + ν, and after every step ν += (dual_lr / steps per epoch) · log(E[params] / budget),
floored at 0. It is off by default because gates are independent: on an edge of 20 slices each
one is redundant while its siblings are open, so a pressure large enough to reach a 100x budget
(ν ≈ 12 on full MNIST) closed the costliest edge's gates together, in one sweep the loss could not
answer, and the MLP's first TTM layer ended at ranks [15, 1, 5] (a Kronecker product; −0.5 points
against [8, 5, 5] from the cuts alone, which remove one least important slice at a time and train
on). `preset: paper` turns the cuts and the refill off.

When `freeze_at_target` and the parameter count at evaluation gates reaches the attached budget
(`attach(model, budget_params)`; None never freezes), the gates freeze as in the authors' code: μ
stops training, gates turn deterministic and the penalty stops.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn

from .base import RankMethod


class L0Rank(RankMethod):
    name = "l0"

    def __init__(self, **hyperparameters):
        super().__init__(**hyperparameters)
        if not self.hp["sigma"] > 0:
            raise ValueError(f"sigma: the gate noise must be > 0, got {self.hp['sigma']!r}")
        self.frozen = False
        self.nu = 0.0  # the dual variable of the budget constraint
        self._final_state: dict | None = None

    def _attach(self) -> None:
        self.mu = nn.ModuleList(
            nn.ParameterList(nn.Parameter(layer.weight.factors[0].new_zeros(size)) for size in layer.max_ranks)
            for layer in self.layers.values()
        )
        for i, layer in enumerate(self.layers.values()):
            layer.weight.slice_gates = partial(self._gate, i)

    def _weights(self):
        return [layer.weight for layer in self.layers.values()]

    # -- gates ---------------------------------------------------------------------------
    def _forced(self, i: int, edge: int) -> torch.Tensor:
        """One-hot of the slice held open: the highest μ among the slices the mask keeps."""
        mu, mask = self.mu[i][edge].detach(), self._weights()[i].mask(edge)
        forced = torch.zeros_like(mask, dtype=torch.bool)
        forced[torch.argmax(mu.masked_fill(mask == 0, -math.inf))] = True
        return forced

    def _gate(self, i: int, edge: int, noisy: bool | None = None) -> torch.Tensor:
        """The `slice_gates` hook: noisy while its tensor trains (until frozen), else deterministic."""
        if noisy is None:
            noisy = self._weights()[i].training and not self.frozen
        z = self.mu[i][edge] + self.hp["shift"]
        if noisy:
            z = z + self.hp["sigma"] * torch.randn_like(z)
        return torch.where(self._forced(i, edge), torch.ones_like(z), z.clamp(0, 1))

    def open_prob(self, i: int, edge: int) -> torch.Tensor:
        """P(z > 0) = Φ((μ + shift)/σ) per slice; 1 for the forced slice, 0 where masked."""
        p = torch.special.ndtr((self.mu[i][edge] + self.hp["shift"]) / self.hp["sigma"])
        p = torch.where(self._forced(i, edge), torch.ones_like(p), p)
        return p * (self._weights()[i].mask(edge) != 0)

    def _eval_ranks(self, i: int) -> list[int]:
        weight = self._weights()[i]
        return [int(((self._gate(i, e, noisy=False) > 0) & (weight.mask(e) != 0)).sum())
                for e in range(weight.num_edges)]

    # -- training ------------------------------------------------------------------------
    def expected_fraction(self) -> torch.Tensor:
        """E[weight parameters] / weight parameters at max rank, over all tensorized layers."""
        expected = sum(
            weight.params_at([self.open_prob(i, e).sum() for e in range(weight.num_edges)])
            for i, weight in enumerate(self._weights())
        )
        return expected / sum(weight.num_parameters(effective=False) for weight in self._weights())

    def penalty(self) -> torch.Tensor:
        return torch.zeros(()) if self.frozen else (self.hp["lam"] + self.nu) * self.expected_fraction()

    def eval_params(self) -> int:
        """Parameters of the tensorized layers (biases included, as budgets count them) at eval gates."""
        return sum(
            layer.params_at(self._eval_ranks(i))
            for i, layer in enumerate(self.layers.values())
        )

    @torch.no_grad()
    def step(self, epoch: int, batch: int) -> None:
        if self.hp["budget_aware"] and not self.frozen and self.budget_params:
            at_max = sum(weight.num_parameters(effective=False) for weight in self._weights())
            expected = float(self.expected_fraction()) * at_max
            self.nu = max(0.0, self.nu + self.dual_step() * math.log(max(expected, 1.0) / self.budget_params))
        super().step(epoch, batch)
        if (self.hp["freeze_at_target"] and not self.frozen and self.budget_params is not None
                and self.eval_params() <= self.budget_params):
            self.freeze()

    def freeze(self) -> None:
        """Stop training the gates (no gradient, so the optimizer skips them) and their noise."""
        for mu in self.mu.parameters():
            mu.requires_grad_(False)
            mu.grad = None
        self.frozen = True

    def param_groups(self, lr: float) -> list[dict]:
        params = [p for p in self.mu.parameters() if p.requires_grad]
        return [{"params": params, "lr": self.hp["gate_lr"]}] if params else []

    # -- selection -----------------------------------------------------------------------
    @torch.no_grad()
    def importance(self) -> dict[str, list[torch.Tensor]]:
        """softplus((μ + shift)/σ), of the probit of P(gate open): the same order and the same scale
        in every layer, without the ties P itself has once open gates saturate near 1, and > 0 so
        that it can be divided by a slice's cost (budget.prune_to_budget)."""
        return {name: [torch.nn.functional.softplus((mu.detach() + self.hp["shift"]) / self.hp["sigma"])
                       for mu in self.mu[i]]
                for i, name in enumerate(self.layers)}

    @torch.no_grad()
    def natural_masks(self) -> dict[str, list[torch.Tensor]]:
        return {name: [self._gate(i, e, noisy=False) > 0 for e in range(layer.weight.num_edges)]
                for i, (name, layer) in enumerate(self.layers.items())}

    def detach(self) -> None:
        """Fold the evaluation gates into the factors, whatever mode the model is in. The state is
        kept as it is now: once the layers are pruned, their slices no longer line up with the gates."""
        self._final_state = self.state()
        for i, weight in enumerate(self._weights()):
            weight.slice_gates = partial(self._gate, i, noisy=False)
        super().detach()

    @torch.no_grad()
    def state(self) -> dict:
        if self._final_state is not None:
            return self._final_state
        return {
            **self.budget_state(),
            "frozen": self.frozen,
            "dual": self.nu,
            "expected_fraction": float(self.expected_fraction()),
            "eval_params": self.eval_params(),
            "open_prob": {name: [self.open_prob(i, e).tolist() for e in range(self.layers[name].weight.num_edges)]
                          for i, name in enumerate(self.layers)},
            "ranks_at_eval_gates": {name: self._eval_ranks(i) for i, name in enumerate(self.layers)},
        }
