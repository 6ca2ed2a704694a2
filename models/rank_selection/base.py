"""The one interface every rank-selection method implements (budget arithmetic: budget.py).

A method attaches to a model's factorized layers from the outside (hooks on
their `FactorizedTensor`s, its own parameters in its own module), adds a
penalty to the loss, updates itself after optimizer steps, and finally
`select(budget)` leaves masks that keep the model at or under the budget.
`fit` drives every method the same way:

    method.attach(model, budget_params)  # after tensorize, before the optimizer is built
    for epoch in range(method.search_epochs(epochs)):
        loss = task_loss + method.penalty();  ...; optimizer.step(); method.step(epoch, batch)
        method.end_epoch(epoch)
    method.measure(model, held_out_batches)
    method.select()                 # masks set, total <= the attached budget (or BudgetError)
    method.detach()                 # hooks removed, function unchanged
    layer.prune() for every layer   # factors physically shrink
    ... the remaining epochs and the fine-tune train the pruned model without the method
"""

from __future__ import annotations

import torch
from torch import nn

from ranksearch.models.tensorized import FactorizedLayer, factorized_layers

from .budget import COST_SCOPES, prune_to_budget, tensorized_params
from .schedule import CutSchedule, cut_to


class RankMethod(nn.Module):
    """Base class: subclasses set `name`, implement `_attach` and `importance`, and may
    override `penalty`, `step`, `end_epoch`, `natural_masks`, `select`, `_detach`, `state`."""

    name = ""
    # True for a method that only allocates ranks (lwiq): `fit` then decomposes the warmed-up
    # layers afresh at them instead of keeping the selected slices
    refit_after_select = False

    def __init__(self, **hyperparameters):
        super().__init__()
        self.hp = dict(hyperparameters)
        fraction = self.hp.get("search_fraction", 1.0)
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise ValueError(f"search_fraction: expected a fraction in (0, 1], got {fraction!r}")
        if self.hp.get("cost_scope", "layer") not in COST_SCOPES:
            raise ValueError(f"cost_scope: expected one of {', '.join(COST_SCOPES)}, got {self.hp['cost_scope']!r}")
        power = self.hp.get("cost_power", 0.0)
        if isinstance(power, bool) or not isinstance(power, (int, float)) or power < 0:
            raise ValueError(f"cost_power: expected a number >= 0, got {power!r}")
        self.layers: dict[str, FactorizedLayer] = {}
        self.budget_params: int | None = None
        self.reached_params: int | None = None  # where the search left the model, before select's cut
        self._planned_epochs = 0  # search epochs, from search_epochs(); 0: no gradual cuts
        self._batches_per_epoch: int | None = None
        self._last_batch: int | None = None
        self._cuts = (CutSchedule(self.hp.get("cut_start", 0.2), self.hp.get("cut_end", 0.8))
                      if self.hp.get("budget_aware") else None)

    # -- lifecycle -----------------------------------------------------------------------
    def attach(self, model: nn.Module, budget_params: int | None = None) -> None:
        """Hook onto `model`'s factorized layers. `budget_params` (resolved by budget.resolve_budget)
        is the one place a method learns its budget: budget-aware searches steer towards it and
        `select()` ends at or under it."""
        self.budget_params = budget_params
        if self._cuts is not None:
            self._cuts.origin = None
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
        """After each optimizer step. Budget-aware methods (schedule.py) cut towards the budget
        here; subclasses call this after their own update."""
        if batch == 0 and self._last_batch is not None:  # a new epoch: the last one's length is known
            self._batches_per_epoch = self._last_batch + 1
        self._last_batch = batch
        if self._cuts is None or self.budget_params is None or not self._planned_epochs:
            return
        target = self._cuts.target(self.progress(epoch, batch), tensorized_params(self.layers), self.budget_params)
        if target is not None:
            cut_to(self.layers, self.importance(), target, **self.cost_options())

    def dual_step(self) -> float:
        """The dual variable's step after one optimizer step. `dual_lr` is per epoch, so the pressure
        grows at the same pace whatever an epoch's length (per step, the KL boost hit its cap within
        ~100 of the 469 steps of a full-MNIST epoch and collapsed a TT layer); a step of the first
        epoch, whose length is not known yet, counts as 1/64 of an epoch."""
        return self.hp["dual_lr"] / (self._batches_per_epoch or 64)

    def progress(self, epoch: int, batch: int) -> float:
        """Fraction of the planned search done after this step (epoch-granular in the first
        epoch, whose length is not known yet)."""
        done = epoch + ((batch + 1) / self._batches_per_epoch if self._batches_per_epoch else 0.0)
        return min(1.0, done / max(self._planned_epochs, 1))

    def end_epoch(self, epoch: int) -> None:
        """After each training epoch."""

    def search_epochs(self, epochs: int) -> int:
        """How many of the training epochs run with the method attached (the rank search):
        `search_fraction` of them (all when the method has none), at least one. The budget-aware
        cut schedule is planned over them. LWIQ's may be a fraction (the trainer stops partway
        through an epoch and resumes it after the selection)."""
        n = min(epochs, max(1, round(epochs * self.hp.get("search_fraction", 1.0))))
        self._planned_epochs = n
        return n

    def dense_warmup_epochs(self, epochs: int) -> int:
        """Epochs the network trains dense before it is decomposed and the method attaches (0: it is
        tensorized at max rank from the start). LWIQ's paper mode measures a trained network."""
        return 0

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
    def select(self, budget_params: int | None = None) -> dict[str, list[int]]:
        """Set masks: the method's own choice, then least-important slices dropped until the
        budget (the attached one unless given) holds. A budget-aware search that its own choice
        left under the attached budget is filled back up to it. Returns ranks per layer."""
        budget_params = self._budget(budget_params)
        importance = self.importance()
        keeps = self._own_choice(importance)
        self.reached_params = sum(layer.params_at([int(k.sum()) for k in keeps[name]]) if name in keeps
                                  else layer.num_parameters() for name, layer in self.layers.items())
        # a search driven to this budget keeps what its own threshold would drop below it, and the
        # cut below takes the least important first (Bayesian's prior alone left full-MNIST MLPs at 0.3x)
        if not (self.hp.get("budget_aware") and budget_params == self.budget_params
                and self.reached_params < budget_params):
            for name, layer_keeps in keeps.items():
                for edge, keep in enumerate(layer_keeps):
                    self.layers[name].weight.set_mask(edge, keep)
        prune_to_budget(self.layers, importance, budget_params, **self.cost_options())
        return {name: layer.ranks for name, layer in self.layers.items()}

    def _own_choice(self, importance) -> dict[str, list[torch.Tensor]]:
        """`natural_masks` within the current masks, at least one slice per edge (the best one)."""
        keeps = {}
        for name, layer_keeps in (self.natural_masks() or {}).items():
            weight = self.layers[name].weight
            keeps[name] = []
            for edge, keep in enumerate(layer_keeps):
                keep = keep.to(torch.bool) & (weight.mask(edge) != 0)
                if not keep.any():  # the method dropped every slice: keep its best one
                    keep[int(torch.argmax(importance[name][edge]))] = True
                keeps[name].append(keep)
        return keeps

    def cost_options(self) -> dict:
        """How cuts weigh a slice's cost (budget.prune_to_budget); importance alone without them."""
        return {"cost_power": self.hp.get("cost_power", 0.0), "cost_scope": self.hp.get("cost_scope", "layer")}

    def _budget(self, budget_params: int | None) -> int:
        budget = self.budget_params if budget_params is None else budget_params
        if budget is None:
            raise ValueError(f"{self.name}: no budget; pass budget_params to attach() or select()")
        return budget

    def state(self) -> dict:
        """JSON-able summary for the run record."""
        return {}

    def budget_state(self) -> dict:
        """How close the search itself came to the budget: `reached_params` (the method's own masks
        at select, before its cut) over `budget_params`."""
        if self.reached_params is None or not self.budget_params:
            return {}
        return {"reached_params": self.reached_params, "budget_params": self.budget_params,
                "reached_over_budget": round(self.reached_params / self.budget_params, 4)}
