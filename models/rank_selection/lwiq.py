"""LWIQ: layer-wise imprinting quantitation (Luo, Liu et al., arXiv 2408.01534).

Each layer's significance is how much a cheap proxy classifier built on its
output beats the one built on the previous layer's; ranks then follow
significance, scaled by one factor to any budget. Measuring is forward passes
only, and a new budget reuses the measurement, which is where the speed-up over
search methods comes from. The paper has no public code; these are our choices:

- Warm-up: `warmup_epochs` (default 1) of ordinary training before measuring, so
  features mean something; the remaining epochs train the pruned model. A fraction stops
  partway through the first epoch and the pruned model trains the rest of it. The warm-up is
  most of LWIQ's rank-search time: on LeNet-5 (TT 4.5 %) half an epoch took it from 22 s to 12 s
  (L0 and Bayesian 70-78 s) at -0.08 points, but it cost the MLP 0.29 points in TTM at 2 % (full
  MNIST) and 0.5 on the demo's 63-step epochs, so one epoch stays the default (README).
  `start` says what trains: "tensorized" (default) the max-rank tensorized model, whose
  slices are then truncated to the allocated ranks; "dense" (the paper, `preset: paper`) the
  dense network, which is measured, then decomposed (TT-SVD / HOSVD / CP-ALS) at the allocated
  ranks and fine-tuned. The dense warm-up counts as rank-search time.
- Features: each factorized layer's output (before any activation that follows
  it), caught by forward hooks; layer order is the order they first run, so
  model code that registers modules out of order is still measured in execution
  order. A layer run several times in one forward is measured at its first call.
  Pooling to at most `pool_features` (default 512) values: conv outputs are
  average-pooled to the largest g×g grid with channels·g² within that (global
  averages, then groups of channels, when even g = 1 is too wide); linear /
  embedding outputs (B, ..., F) are averaged over the middle dims, then over
  groups of features. Narrower outputs are kept whole. (Global averages alone
  made LeNet-5's conv2 score 0.55 against 0.80 for the raw pixels on MNIST: a
  negative gain that starved it to rank 1.)
- Baseline (layer 0): the model input pooled the same way (images (B, C, H, W)
  as a conv output) when it is a float tensor; otherwise (ids, a tuple of
  inputs) predicting the most frequent class, the accuracy of a classifier
  without features.
- The output layer (the one whose output the model returns, e.g. the classifier
  head) gets significance 1: its input already is what a linear classifier sees,
  so its imprinting gain is ~0 by construction and says nothing of its rank. With
  the floor instead, LeNet-5's Tucker head fell to rank 1 and accuracy to 74 %.
- Proxy classifier: weight imprinting (Qi et al., CVPR 2018): class weight =
  normalized sum of the L2-normalized features of that class, prediction =
  argmax cosine similarity. Up to `measure_batches` (default 8) held-out
  batches; the first half of their samples imprints, the second half is scored
  (half of the batches when they are equal; a short last batch cannot leave the
  scored half tiny). With ~250 scored samples one sample is 0.4 % of accuracy,
  the size of many layers' gains on small models: raise `measure_batches` when
  layers are close. Classes absent from the imprinting half are never
  predicted. Labels are cast to int (binary CTR labels become classes 0/1).
- Significance: gain = acc(l) - acc(previous measured layer or input), divided
  by the largest gain among the layers other than the output layer (below) and
  floored at `min_share` (a layer that loses accuracy still gets min_share of
  the most significant layer's share). If no layer
  gains, all layers count equally. Layers between factorized ones that are not
  factorized are credited to the next factorized layer; a factorized layer that
  never ran gets the floor.
- Allocation: layer l keeps a fraction f_l(a) = min(1, a * s_l) of the max rank on
  every edge, r_e = max(1, round(f_l * max_rank_e)); the one scale a is the
  largest found by bisection with total effective parameters (biases included)
  <= budget. The floor is relative to the most significant layer rather than an
  absolute fraction: with an absolute floor, clip(a * s_l, min_share, 1), a layer
  of zero gain could never grow past min_share, so large budgets went unused
  (on digits, CP at a 0.9 budget used 63 % of it and left the classifier at
  rank 1). a = 0 is rank 1 everywhere, a = 1 / min_share full rank everywhere,
  and ranks never shrink as the budget grows.
- Slices within an edge: the r_e with the largest norm, a slice's norm being the
  product of its norms in every factor the edge indexes (a CP component's scale,
  a TT core pair's shared slice), rather than the first r_e indices. Those are
  the masks `select` leaves; `fit` then (`refit`, the default, start
  "tensorized", not CP) decomposes each warmed-up layer's full tensor afresh at
  the allocated ranks (TT-SVD / HOSVD): the largest slices of an unnormalized
  TT are not its best truncation (a core's slice norms depend on how the scale
  is spread between cores). Full MNIST, MLP at 1 %: TT 0.9450 -> 0.9511, TTM
  0.9697 -> 0.9715 (mean of 2 seeds; `fixed` 0.9486 / 0.9689).
"""

from __future__ import annotations

import itertools
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from ranksearch.models.tensorized import FactorizedConv2d

from .base import RankMethod
from .budget import check_budget_floor, resolve_budget
from .hyperparams import METHOD_DEFAULTS

STARTS = ("tensorized", "dense")


def pool_features(t: torch.Tensor, size: int, spatial: bool = False) -> torch.Tensor:
    """(B, C, H, W) with `spatial`, else (B, ..., F) -> (B, <= size) float features on the CPU.

    Spatial maps keep the coarsest layout that fits: average pooling to the largest g×g grid
    with C·g² <= size (g >= 1), so a conv layer is compared with the layers around it on
    where its features fire, not only on their global means."""
    t = t.detach().float()
    if spatial and t.dim() == 4:
        grid = max(1, math.isqrt(size // t.shape[1]))
        t = F.adaptive_avg_pool2d(t, min(grid, t.shape[2], t.shape[3])).flatten(1) if grid > 1 else t.mean((2, 3))
    elif t.dim() > 2:
        t = t.flatten(2).mean(2) if spatial else t.flatten(1, -2).mean(1)
    if t.shape[1] > size:
        t = F.adaptive_avg_pool1d(t.unsqueeze(1), size).squeeze(1)
    return t.cpu()


def imprint_accuracy(fit_x: torch.Tensor, fit_y: torch.Tensor, eval_x: torch.Tensor, eval_y: torch.Tensor) -> float:
    """Accuracy on (eval_x, eval_y) of the cosine classifier imprinted from (fit_x, fit_y)."""
    classes = int(max(fit_y.max(), eval_y.max())) + 1
    sums = torch.zeros(classes, fit_x.shape[1]).index_add_(0, fit_y, F.normalize(fit_x, dim=1))
    scores = F.normalize(eval_x, dim=1) @ F.normalize(sums, dim=1).T
    scores[:, torch.bincount(fit_y, minlength=classes) == 0] = -math.inf
    return float((scores.argmax(1) == eval_y).float().mean())


def significance(gain: dict[str, float], output_layer: str | None, floor: float) -> dict[str, float]:
    """Gains relative to the largest among the layers other than the output layer, floored at
    `floor`; the output layer gets 1. Its gain says nothing of its rank, so it does not scale the
    others either: on full MNIST the head's gain, twice the first layer's, halved that layer's share
    while the nearly dense TT head kept 85 % of its max ranks (TT at 1 %: about -1 point)."""
    scored = [g for name, g in gain.items() if name != output_layer] or list(gain.values())
    top = max(scored)
    out = {name: min(1.0, max(g / top, floor)) if top > 0 else 1.0 for name, g in gain.items()}
    if output_layer is not None:
        out[output_layer] = 1.0
    return out


def slice_norms(weight) -> list[torch.Tensor]:
    """Per edge of a FactorizedTensor: each slice's norm, multiplied over the factors the edge indexes."""
    norms = []
    for edge, size in enumerate(weight.max_ranks):
        score = torch.ones(size)
        for f, d in weight.edge_members(edge):
            factor = weight.factors[f].detach()
            score = score * factor.movedim(d, 0).reshape(size, -1).norm(dim=1).cpu()
        norms.append(score)
    return norms



def _to(obj, device):
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    return obj.to(device) if hasattr(obj, "to") else obj


class LWIQRank(RankMethod):
    name = "lwiq"

    @property
    def refit_after_select(self) -> bool:
        """Whether `fit` decomposes the warmed-up layers afresh at the allocated ranks (`refit`)."""
        return bool(self.hp["refit"])

    def __init__(self, **hyperparameters):
        super().__init__(**{**METHOD_DEFAULTS["lwiq"], **hyperparameters})
        for key in ("measure_batches", "pool_features"):
            if isinstance(self.hp[key], bool) or not isinstance(self.hp[key], int) or self.hp[key] < 1:
                raise ValueError(f"lwiq: {key} must be an integer >= 1, got {self.hp[key]!r}")
        if not 0 < self.hp["min_share"] <= 1:
            raise ValueError(f"lwiq: min_share must lie in (0, 1], got {self.hp['min_share']!r}")
        if self.hp["start"] not in STARTS:
            raise ValueError(f"lwiq: start must be one of {', '.join(STARTS)}, got {self.hp['start']!r}")
        warmup = self.hp["warmup_epochs"]
        if isinstance(warmup, bool) or not isinstance(warmup, (int, float)) or not 0 <= warmup < math.inf:
            raise ValueError(f"lwiq: warmup_epochs must be a number of epochs >= 0 (a fraction ends partway "
                             f"through an epoch), got {warmup!r}")
        self._attach()

    def _attach(self) -> None:
        """A new attachment forgets any earlier measurement."""
        self.significance: dict[str, float] | None = None
        self.proxy_accuracy: dict[str, float | None] = {}
        self.gain: dict[str, float] = {}
        self.input_accuracy = math.nan
        self.output_layer: str | None = None
        self.measure_time_s = math.nan
        self.measure_samples = 0
        self.scale: float | None = None

    def search_epochs(self, epochs: int) -> int:
        return 0 if self.hp["start"] == "dense" else min(self.hp["warmup_epochs"], epochs)

    def dense_warmup_epochs(self, epochs: int) -> int:
        return min(self.hp["warmup_epochs"], epochs) if self.hp["start"] == "dense" else 0

    # -- measuring -------------------------------------------------------------------------
    @torch.no_grad()
    def measure(self, model: nn.Module, batches) -> None:
        """Pooled features of every factorized layer on held-out batches, imprinted proxy
        accuracies, and from them each layer's significance. `model` is the attached model or
        one with the same layer names (the trained dense network, the paper's setting)."""
        if not self.layers:
            raise RuntimeError("lwiq: attach(model) before measure()")
        start = time.perf_counter()
        size = self.hp["pool_features"]
        feats: dict[str, list[torch.Tensor]] = {name: [] for name in self.layers}
        order: list[str] = []
        seen: dict[str, torch.Tensor] = {}  # layers already recorded in the current forward -> output

        def hook(name, spatial):
            def record(module, args, output):
                if name not in seen:
                    seen[name] = output
                    if name not in order:
                        order.append(name)
                    feats[name].append(pool_features(output, size, spatial))
            return record

        # hooked by name on `model` when it has the layer (the trained dense network a pretrained
        # start was decomposed from carries the same names), else on the attached layer
        def target(name):
            try:
                return model.get_submodule(name)
            except AttributeError:
                return self.layers[name]

        handles = [layer.register_forward_hook(hook(name, isinstance(layer, (FactorizedConv2d, nn.Conv2d))))
                   for name, layer in ((n, target(n)) for n in self.layers)]
        device = next(iter(self.layers.values())).weight.factors[0].device
        inputs, labels = [], []
        was_training = model.training
        model.eval()
        try:
            for x, y in itertools.islice(batches, self.hp["measure_batches"]):
                seen.clear()
                x = _to(x, device)
                if isinstance(x, (tuple, list)):
                    out = model(*x)
                    inputs.append(None)
                else:
                    out = model(x)
                    inputs.append(pool_features(x, size, spatial=x.dim() == 4) if x.is_floating_point() else None)
                self.output_layer = next((name for name, o in seen.items() if o is out), None)
                labels.append(torch.as_tensor(y).reshape(-1).long().cpu())
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)
        if not labels:
            raise ValueError("lwiq: measure() got no held-out batches")

        y = torch.cat(labels)
        if len(y) < 2:
            raise ValueError(f"lwiq: measure() needs at least 2 held-out samples (one to imprint, one to score), "
                             f"got {len(y)}; use more data (max_train)")
        n, cut = len(labels), len(y) // 2
        fit_y, eval_y = y[:cut], y[cut:]

        def accuracy(chunks):
            x = torch.cat(chunks)
            return imprint_accuracy(x[:cut], fit_y, x[cut:], eval_y)

        if all(i is not None for i in inputs):
            prev = accuracy(inputs)
        else:
            prev = float((eval_y == torch.mode(fit_y).values).float().mean())
        self.input_accuracy = prev
        self.proxy_accuracy, self.gain = {}, {}
        for name in order + [name for name in self.layers if name not in order]:
            if len(feats[name]) != n:  # never ran (or not on every batch): nothing to measure
                self.proxy_accuracy[name], self.gain[name] = None, 0.0
                continue
            acc = accuracy(feats[name])
            self.proxy_accuracy[name], self.gain[name] = acc, acc - prev
            prev = acc
        self.significance = significance(self.gain, self.output_layer, self.hp["min_share"])
        self.measure_samples = len(y)
        self.measure_time_s = time.perf_counter() - start

    # -- allocating ------------------------------------------------------------------------
    def _ranks(self, scale: float) -> dict[str, list[int]]:
        ranks = {}
        for name, layer in self.layers.items():
            share = min(scale * self.significance[name], 1.0)
            ranks[name] = [max(1, round(share * m)) for m in layer.max_ranks]
        return ranks

    def _total(self, scale: float) -> int:
        return sum(self.layers[name].params_at(r) for name, r in self._ranks(scale).items())

    def _solve(self, budget) -> float:
        """The largest scale whose ranks fit the budget (bisection; parameters grow with the scale)."""
        if self.significance is None:
            raise RuntimeError("lwiq: no measurement yet; call measure(model, held_out_batches) before select/allocate")
        budget = resolve_budget(budget, self.layers)
        check_budget_floor(self.layers, budget)  # scale 0 is rank 1 on every edge
        lo, hi = 0.0, 1.0 / min(self.significance.values())  # hi: every layer at full rank
        if self._total(hi) <= budget:
            return hi
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if self._total(mid) <= budget else (lo, mid)
        return lo

    def allocate(self, budget) -> dict[str, list[int]]:
        """Ranks per layer for `budget` (fraction or parameter count) from the stored
        measurement; changes no mask, so many budgets can be inspected cheaply."""
        return self._ranks(self._solve(budget))

    @torch.no_grad()
    def select(self, budget_params: int | None = None) -> dict[str, list[int]]:
        """Masks for `budget_params` (the attached budget unless given): allocated ranks,
        largest-norm slices kept on each edge. Every mask is rewritten, so earlier selections
        leave no trace."""
        self.scale = self._solve(self._budget(budget_params))
        for name, ranks in self._ranks(self.scale).items():
            weight = self.layers[name].weight
            for edge, (r, norms) in enumerate(zip(ranks, slice_norms(weight))):
                keep = torch.zeros(len(norms), dtype=torch.bool)
                keep[torch.topk(norms, r).indices] = True
                weight.set_mask(edge, keep)
        return {name: layer.ranks for name, layer in self.layers.items()}

    def importance(self) -> dict[str, list[torch.Tensor]]:
        """Slice norms (the order used within an edge), normalized per edge and weighted by the
        layer's significance so that scores also rank layers against each other."""
        out = {}
        for name, layer in self.layers.items():
            weight = 1.0 if self.significance is None else self.significance[name]
            out[name] = [weight * n / n.max().clamp_min(1e-12) for n in slice_norms(layer.weight)]
        return out

    def state(self) -> dict:
        if self.significance is None:
            return {}
        return {
            "layer_order": list(self.proxy_accuracy),
            "input_proxy_accuracy": self.input_accuracy,
            "proxy_accuracy": dict(self.proxy_accuracy),
            "gain": dict(self.gain),
            "significance": dict(self.significance),
            "output_layer": self.output_layer,
            "scale": self.scale,
            "measure_samples": self.measure_samples,
            "measure_time_s": self.measure_time_s,
        }
