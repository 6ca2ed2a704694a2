"""Budget-aware search: the method drives the model to its budget during the search epochs.

Without it (the papers' exact settings, `preset: paper`), Bayesian's and L0's natural ranks stop
far above small budgets (L0's gates ended at 34-63 % of the max-rank parameters for 2-4.5 %
targets on MNIST), so the final ranks came from `select`'s one cut, not from the search. With it:

- gradual cuts: from `cut_start` to `cut_end` (fractions of the search epochs) the target falls
  geometrically from the parameters at `cut_start` to the budget (equal time, equal factor: the
  right pace for a 100x compression; Zhu & Gupta 2017's cubic schedule is the linear-sparsity
  analogue), and after every optimizer step the least important kept slices are cut until the
  model is at the target (`prune_to_budget`, with the method's importance of that moment). Each
  cut is followed by more training, and the search ends at the budget on its own;
- a dual variable (Lagrange multiplier, as in constrained L0, Louizos et al. 2018) that each
  method raises by dual ascent while what it would keep on its own exceeds the budget:
  Bayesian's KL weight, and L0's penalty weight only when `dual_lr` > 0 (off by default: it
  closed whole edges at once, l0.py).
"""

from __future__ import annotations

import math

from .budget import minimum_params, prune_to_budget, tensorized_params


class CutSchedule:
    """When and how far to cut. `progress` is the fraction of the search done (0 … 1)."""

    def __init__(self, start: float, end: float):
        if not 0 <= start < end <= 1:
            raise ValueError(f"cut_start/cut_end: expected 0 <= cut_start < cut_end <= 1, got {start!r}, {end!r}")
        self.start, self.end = start, end
        self.origin: int | None = None  # parameters when the cuts began

    def target(self, progress: float, current: int, budget: int) -> int | None:
        """The parameter count to cut to now, or None before the window opens."""
        if progress < self.start:
            return None
        if self.origin is None:
            self.origin = max(current, budget)
        t = min(1.0, (progress - self.start) / (self.end - self.start))
        return max(budget, int(math.exp((1 - t) * math.log(self.origin) + t * math.log(budget))))


def cut_to(layers, importance, target: int, **cost) -> bool:
    """Cut to `target` when over it and the floor allows; whether anything was cut."""
    if tensorized_params(layers) <= target or target < minimum_params(layers):
        return False
    prune_to_budget(layers, importance, target, **cost)
    return True
