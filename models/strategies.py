"""Every method `fit` and `compress` run, on one lifecycle: the baselines (`dense`, `fixed`,
`posthoc`) and the rank searches (`bayesian`, `l0`, `lwiq`) are strategies in one registry, so
neither caller branches on a method's name.

A strategy gets a `Run` (the network, its trainer and task, format, budget, start) and leaves
the network trained at or under the budget. Every compressed strategy trains for
`epochs + finetune_epochs` epochs in total, so methods are compared at equal training cost:
- dense: the uncompressed baseline.
- fixed: the same rank on every edge, the largest that fits the budget, from the start
  (pretrained: the trained layers decomposed at that rank).
- posthoc: train dense for `epochs`, decompose at the fixed rank that fits, fine-tune.
- bayesian, l0, lwiq: tensorize at max_rank (pretrained: decompose the trained layers), search
  ranks with the method for `method.search_epochs(epochs)` epochs, select to the budget, prune,
  train the rest. When nothing trained between decomposing and selecting (lwiq's pretrained
  start: no warm-up), the method measures the trained dense network itself and the layers are
  decomposed afresh at the selected ranks (better than truncating the max-rank factors); a
  method that only allocates ranks (`refit_after_select`: lwiq) has its warmed-up layers
  decomposed afresh at them in the same way.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ranksearch.models.rank_selection import make_method
from ranksearch.models.rank_selection.budget import resolve_budget, uniform_rank_for_budget
from ranksearch.models.tensorized import factorized_layers, from_dense

INITS = ("random", "pretrained")
REFIT_MAX_ENTRIES = 1 << 24  # largest layer (dense entries) a refit materializes: 64 MB in float32
# Under init="pretrained" these method defaults change: LWIQ measures the trained network as is.
PRETRAINED_DEFAULTS = {"lwiq": {"warmup_epochs": 0}}


@dataclass
class Run:
    net: nn.Module
    task: object
    trainer: object
    cfg: dict
    format: str | None
    budget: object
    tensorize: Callable  # (net, format, max_rank, init "random"|"decompose") -> {name: factorized layer}
    probe: Callable  # () -> factorized layers at max_rank of a throwaway copy (budget arithmetic only)
    init: str = "random"
    method_params: dict = field(default_factory=dict)
    dense_reference: nn.Module | None = None  # pretrained: the trained network before compression
    budget_params: int | None = None
    method_state: dict = field(default_factory=dict)
    search_time: float = 0.0
    start_metrics: dict | None = None  # the compressed network's validation metrics before it trains

    def started(self) -> None:
        """Called once the network is factorized, before it trains: how good the start is
        (pretrained: the trained model minus the decomposition error; random: chance)."""
        self.start_metrics = self.task.validate(self.net)

    @property
    def total_epochs(self) -> int:
        return self.cfg["epochs"] + self.cfg["finetune_epochs"]

    @property
    def pretrained(self) -> bool:
        return self.init == "pretrained"

    def uniform_rank(self, layers: dict) -> int:
        self.budget_params = resolve_budget(self.budget, layers)
        return uniform_rank_for_budget(layers, self.budget_params)


STRATEGIES: dict[str, "Strategy"] = {}


class Strategy:
    """Subclasses register under `name` and implement `run`."""

    name = ""
    compresses = True  # False: no format, no budget in the record
    builds_dense = False  # True: the network must start dense (it trains dense before decomposing)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for name in getattr(cls, "names", (cls.name,)):
            STRATEGIES[name] = cls(name)

    def __init__(self, name: str):
        self.name = name

    def run(self, run: Run) -> None:
        raise NotImplementedError


def get_strategy(name: str) -> Strategy:
    if name not in STRATEGIES:
        raise ValueError(f"method: unknown method {name!r}; expected one of {', '.join(STRATEGIES)}")
    return STRATEGIES[name]


class Dense(Strategy):
    name, compresses, builds_dense = "dense", False, True

    def run(self, run: Run) -> None:
        run.trainer.run(run.total_epochs, "train")


class Fixed(Strategy):
    name = "fixed"

    def run(self, run: Run) -> None:
        if run.pretrained:
            run.tensorize(run.net, run.format, run.uniform_rank(run.probe()), "decompose")
            run.started()
        else:
            layers = run.tensorize(run.net, run.format, run.cfg["max_rank"], "random")
            rank = run.uniform_rank(layers)
            for layer in layers.values():
                for edge, m in enumerate(layer.rank_masks):
                    layer.weight.set_mask(edge, torch.arange(m.numel()) < rank)
                layer.prune()
            run.started()
        run.trainer.run(run.total_epochs, "train")


class Posthoc(Strategy):
    name, builds_dense = "posthoc", True

    def run(self, run: Run) -> None:
        cfg, trainer = run.cfg, run.trainer
        trainer.restart_schedule(cfg["epochs"])
        trainer.run(cfg["epochs"], "dense")
        start = time.perf_counter()
        run.tensorize(run.net, run.format, run.uniform_rank(run.probe()), "decompose")
        run.search_time = time.perf_counter() - start
        run.started()
        trainer.restart_schedule(cfg["finetune_epochs"])
        trainer.run(cfg["finetune_epochs"], "finetune")


class Search(Strategy):
    """A rank-selection method of models.rank_selection driving the search epochs."""

    names = ("bayesian", "l0", "lwiq")

    def run(self, run: Run) -> None:
        cfg, trainer, net = run.cfg, run.trainer, run.net
        params = {**(PRETRAINED_DEFAULTS.get(self.name, {}) if run.pretrained else {}), **run.method_params}
        method = make_method(self.name, **params)
        # rank-search time: from here to the pruned model, less the per-epoch validation rows, which every
        # method pays alike per completed epoch (a fractional warm-up would otherwise look cheaper for skipping one)
        start, reporting = time.perf_counter(), trainer.report_seconds
        # a method that measures a trained network (LWIQ `start: dense`, the paper) trains it dense first
        dense_epochs = 0 if run.pretrained else min(method.dense_warmup_epochs(cfg["epochs"]), cfg["epochs"])
        if dense_epochs:
            trainer.restart_schedule(dense_epochs)
            trainer.run(dense_epochs, "dense")
            run.dense_reference = copy.deepcopy(net).eval()
        decompose = run.pretrained or dense_epochs > 0
        layers = run.tensorize(net, run.format, cfg["max_rank"], "decompose" if decompose else "random")
        run.budget_params = resolve_budget(run.budget, layers)
        device = next(iter(layers.values())).weight.factors[0].device
        method = method.to(device)
        run.started()
        method.attach(net, run.budget_params)
        search_epochs = min(method.search_epochs(cfg["epochs"]), cfg["epochs"] - dense_epochs)
        trainer.restart_schedule(search_epochs)
        trainer.run(search_epochs, "search", method)
        untouched = decompose and search_epochs == 0 and run.dense_reference is not None
        net.eval()
        method.measure(run.dense_reference if untouched else net, run.task.heldout_batches())
        # a method that only allocates ranks (lwiq) keeps the best approximation of the warmed-up layers
        # at them (TT-SVD / HOSVD of their full tensors) rather than the slices that happen to be largest
        # (not CP, whose ALS is no best truncation, nor tables too large to hold dense, e.g. DLRM's)
        refit = method.refit_after_select and not untouched and run.format != "cp"
        warmed = {name: layer.weight.full().detach() for name, layer in layers.items()
                  if refit and layer.dense_parameters() <= REFIT_MAX_ENTRIES}
        method.select()
        method.detach()
        run.method_state = method.state()
        for layer in layers.values():
            layer.prune()
        if untouched:
            redecompose(net, run.dense_reference, run.format)
        with torch.no_grad():
            for name, full in warmed.items():
                layers[name].weight.decompose_from(full)
        run.search_time = time.perf_counter() - start - (trainer.report_seconds - reporting)
        trainer.restart_schedule(run.total_epochs - search_epochs - dense_epochs)
        trainer.run(cfg["epochs"] - search_epochs - dense_epochs, "train")
        trainer.run(cfg["finetune_epochs"], "finetune")


@torch.no_grad()
def redecompose(net: nn.Module, dense: nn.Module, format: str) -> None:
    """Each factorized layer of `net` replaced by its dense counterpart in `dense` decomposed at
    the layer's current ranks (same shapes, so the parameter count is unchanged)."""
    for name, layer in factorized_layers(net).items():
        new = from_dense(dense.get_submodule(name), format, layer.ranks)
        new.to(layer.weight.factors[0].device)
        parent, _, child = name.rpartition(".")
        setattr(net.get_submodule(parent) if parent else net, child, new)
