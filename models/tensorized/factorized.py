"""A tensor stored as factors joined by rank edges, described as an einsum network.

Every format (CP, Tucker, TT, TTM) is a list of factors whose dimensions are
labelled either with a tensor mode or with a rank edge. All the work — the full
tensor, contraction with an input, row lookups, masks, pruning, parameter and
FLOP counts — is done once here from those labels, so the formats themselves are
a few lines each and every rank-selection method drives the same mechanism.

A *rank slice* is one index of one rank edge: a CP component, a Tucker factor
column, a TT/TTM internal rank index (the trailing slice of one core and the
leading slice of the next). Each edge has a 0/1 mask buffer; a method may add a
soft gate (`slice_gates`) or resample factors (`factor_sampler`) from outside.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import opt_einsum
import torch
from torch import nn

Label = tuple[str, int]  # ("mode", i) | ("edge", k) | ("one", j) — a size-1 boundary
BATCH: Label = ("batch", 0)
MAX_EXPRESSIONS = 512  # cached contraction expressions per tensor (one per distinct batch size)


def _optimizer(n_operands: int) -> str:
    """Exhaustive search is cheap up to 5 operands and opt_einsum's 'auto' is not optimal there
    (a Tucker row lookup came out 8-12x costlier than the best order); beyond, 'auto'."""
    return "optimal" if n_operands <= 5 else "auto"


def _bucketed(inputs, shapes) -> tuple:
    """Shapes with every batch-labelled size rounded up to a power of two: the key of a cached path,
    so a lookup batch with a new number of distinct ids reuses a path instead of searching again."""
    return tuple(
        tuple(1 << max(0, int(s) - 1).bit_length() if lb == BATCH else s for lb, s in zip(ls, shape))
        for ls, shape in zip(inputs, shapes)
    )


class FactorizedTensor(nn.Module):
    format: str = ""

    def __init__(self, modes: Sequence[int], factor_labels: Sequence[Sequence[Label]], edge_sizes: Sequence[int]):
        super().__init__()
        self.modes = [int(m) for m in modes]
        self.labels = [tuple(ls) for ls in factor_labels]
        shapes = [[self._label_size(lb, edge_sizes) for lb in ls] for ls in self.labels]
        self.factors = nn.ParameterList([nn.Parameter(torch.empty(s)) for s in shapes])
        for k, size in enumerate(edge_sizes):
            self.register_buffer(f"mask_{k}", torch.ones(size))
        self.num_edges = len(edge_sizes)
        self.slice_gates: Callable[[int], torch.Tensor] | None = None
        self.factor_sampler: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None
        self._expressions: dict = {}

    # ---- description ---------------------------------------------------------------
    def _label_size(self, label: Label, edge_sizes: Sequence[int]) -> int:
        kind, i = label
        return self.modes[i] if kind == "mode" else edge_sizes[i] if kind == "edge" else 1

    def edge_owner(self, edge: int) -> tuple[int, int]:
        """(factor, dim) that carries the edge's mask and gate: the first factor holding it."""
        return self.edge_members(edge)[0]

    def edge_members(self, edge: int) -> list[tuple[int, int]]:
        """Every (factor, dim) indexed by the edge: what pruning one slice removes."""
        return [(f, d) for f, ls in enumerate(self.labels) for d, lb in enumerate(ls) if lb == ("edge", edge)]

    def slice_members(self, edge: int) -> list[tuple[int, int]]:
        """The entries a slice-wise prior or penalty covers (formats may narrow this)."""
        return self.edge_members(edge)

    def mask(self, edge: int) -> torch.Tensor:
        return getattr(self, f"mask_{edge}")

    @property
    def masks(self) -> list[torch.Tensor]:
        return [self.mask(k) for k in range(self.num_edges)]

    def factor_list(self) -> list[nn.Parameter]:
        """list(self.factors) without ParameterList's per-item indexing (8 us for six factors, on
        every table lookup): a ParameterList registers item i as parameter "i", in order."""
        return list(self.factors._parameters.values())

    def all_masks_on(self) -> bool:
        """Whether every mask keeps every slice. Called on each table lookup, so the answer is kept
        until a mask changes: a mask object replaced (prune, .to) or written in place (its
        `_version` counts writes: set_mask, load_state_dict); 6 comparisons on tensors cost ~35 us."""
        masks = self.masks
        seen = self.__dict__.get("_masks_on")
        if seen is None or len(seen[0]) != len(masks) or not all(
            a is b and a._version == v for a, b, v in zip(seen[0], masks, seen[1])
        ):
            seen = (masks, [m._version for m in masks], all(bool((m == 1).all()) for m in masks))
            self.__dict__["_masks_on"] = seen
        return seen[2]

    @property
    def max_ranks(self) -> list[int]:
        return [m.numel() for m in self.masks]

    @property
    def ranks(self) -> list[int]:
        return [int((m != 0).sum()) for m in self.masks]

    def set_mask(self, edge: int, keep: torch.Tensor) -> None:
        """Keep the slices where `keep` is true (at least one per edge)."""
        keep = keep.to(torch.bool).reshape(-1)
        if keep.numel() != self.mask(edge).numel():
            raise ValueError(f"keep: expected {self.mask(edge).numel()} entries for edge {edge}, got {keep.numel()}")
        if not keep.any():
            raise ValueError(f"keep: edge {edge} would have rank 0; at least one slice must stay")
        self.mask(edge).copy_(keep.to(self.mask(edge).dtype))

    # ---- counts ------------------------------------------------------------------------
    def num_parameters(self, effective: bool = True) -> int:
        return self.params_at(self.ranks if effective else self.max_ranks)

    def params_at(self, ranks):
        """Parameters the factors would have with `ranks[e]` slices kept on each edge, masks untouched
        (ints; or expected ranks as tensors, which gives a differentiable expected count)."""
        return sum(
            math.prod(ranks[lb[1]] if lb[0] == "edge" else size for lb, size in zip(labels, factor.shape))
            for labels, factor in zip(self.labels, self.factors)
        )

    # ---- contraction -------------------------------------------------------------------
    def effective_factors(self) -> list[torch.Tensor]:
        """Factors with masks and gates applied: what every contraction uses."""
        factors = list(self.factors)
        if self.factor_sampler is not None and self.training:
            factors = self.factor_sampler(factors)
        for edge in range(self.num_edges):
            scale = self.mask(edge)
            if self.slice_gates is not None:
                scale = scale * self.slice_gates(edge)
            f, d = self.edge_owner(edge)
            view = [1] * factors[f].dim()
            view[d] = -1
            factors[f] = factors[f] * scale.view(view)
        return factors

    def _symbols(self, extra: Sequence[Label] = ()) -> dict:
        names = sorted({lb for ls in self.labels for lb in ls} | set(extra))
        return {lb: opt_einsum.get_symbol(i) for i, lb in enumerate(names)}

    def _equation(self, inputs: Sequence[Sequence[Label]], output: Sequence[Label]) -> str:
        sym = self._symbols([lb for ls in inputs for lb in ls] + list(output))
        lhs = ",".join("".join(sym[lb] for lb in ls) for ls in inputs)
        return lhs + "->" + "".join(sym[lb] for lb in output)

    def _contract(self, key, inputs, output, operands):
        shapes = tuple(tuple(op.shape) for op in operands)
        # the labels are part of the key: two contractions with equal operand shapes (a square
        # tensor applied along different modes) must not share an expression
        labels = (key, tuple(tuple(ls) for ls in inputs), tuple(output))
        expr = self._expressions.get((labels, shapes))
        if expr is None:
            equation = self._equation(inputs, output)
            path_key = ("path", labels, _bucketed(inputs, shapes))
            path = self._expressions.get(path_key)
            if path is None:
                path, _ = opt_einsum.contract_path(
                    equation, *path_key[2], shapes=True, optimize=_optimizer(len(shapes))
                )
            if len(self._expressions) >= MAX_EXPRESSIONS:
                self._expressions.clear()
            self._expressions[path_key] = path
            expr = opt_einsum.contract_expression(equation, *shapes, optimize=path)
            self._expressions[(labels, shapes)] = expr
        return expr(*operands, backend="torch")

    def full(self) -> torch.Tensor:
        """The dense tensor, shape `modes`."""
        out = [("mode", i) for i in range(len(self.modes))]
        return self._contract("full", self.labels, out, self.effective_factors())

    def contract_modes(self, x: torch.Tensor, in_modes: Sequence[int], out_modes: Sequence[int]) -> torch.Tensor:
        """x of shape (B, *modes[in_modes]) -> (B, *modes[out_modes]), without the full tensor
        unless opt_einsum's cost model says building it is cheaper."""
        x_labels = [BATCH] + [("mode", i) for i in in_modes]
        out = [BATCH] + [("mode", i) for i in out_modes]
        return self._contract("apply", [x_labels, *self.labels], out, [x, *self.effective_factors()])

    def _row_labels(self, fixed_modes) -> list[list[Label]]:
        """Factor labels with every fixed mode replaced by the lookup (batch) label."""
        return [[BATCH if lb[0] == "mode" and lb[1] in fixed_modes else lb for lb in ls] for ls in self.labels]

    def gather_rows(self, digits: dict[int, torch.Tensor], out_modes: Sequence[int]) -> torch.Tensor:
        """Entries with the modes in `digits` fixed per lookup: (U, *modes[out_modes]).

        Each factor holding a fixed mode is indexed first, so the work is
        proportional to the number of lookups, never to the size of the tensor.
        """
        factors = []
        for factor, ls in zip(self.effective_factors(), self.labels):
            for d, lb in enumerate(ls):
                if lb[0] == "mode" and lb[1] in digits:
                    factor = factor.index_select(d, digits[lb[1]])
            factors.append(factor)
        out = [BATCH] + [("mode", i) for i in out_modes]
        return self._contract("rows", self._row_labels(digits), out, factors)

    def _cost(self, inputs, output, shapes) -> int:
        _, info = opt_einsum.contract_path(
            self._equation(inputs, output), *shapes, shapes=True, optimize=_optimizer(len(shapes))
        )
        return int(info.opt_cost) // 2  # opt_einsum counts a multiply-add as 2

    def flops(self, x_shape: Sequence[int] | None = None, in_modes=(), out_modes=()) -> int:
        """Multiply-adds of `contract_modes` (or of `full` when x_shape is None), from opt_einsum's path."""
        shapes = [tuple(f.shape) for f in self.factors]
        if x_shape is None:
            return self._cost(self.labels, [("mode", i) for i in range(len(self.modes))], shapes)
        x_labels = [BATCH] + [("mode", i) for i in in_modes]
        out = [BATCH] + [("mode", i) for i in out_modes]
        return self._cost([x_labels, *self.labels], out, [tuple(x_shape), *shapes])

    def row_flops(self, lookups: int, fixed_modes: Sequence[int], out_modes: Sequence[int]) -> int:
        """Multiply-adds of `gather_rows` for `lookups` rows."""
        labels = self._row_labels(fixed_modes)
        shapes = [[lookups if lb == BATCH else s for lb, s in zip(ls, f.shape)] for ls, f in zip(labels, self.factors)]
        return self._cost(labels, [BATCH] + [("mode", i) for i in out_modes], shapes)

    # ---- pruning and initialization ------------------------------------------------------
    @torch.no_grad()
    def prune(self) -> list[torch.Tensor]:
        """Physically drop masked slices; returns the kept indices per edge."""
        kept = [torch.nonzero(m != 0).flatten() for m in self.masks]
        new = [f.detach() for f in self.factors]
        for edge, idx in enumerate(kept):
            for f, d in self.edge_members(edge):
                new[f] = new[f].index_select(d, idx)
        for f, t in enumerate(new):
            self.factors[f] = nn.Parameter(t.contiguous(), requires_grad=self.factors[f].requires_grad)
        for edge, idx in enumerate(kept):
            old = self.mask(edge)
            self.register_buffer(f"mask_{edge}", torch.ones(len(idx), device=old.device, dtype=old.dtype))
        self._expressions.clear()
        return kept

    @torch.no_grad()
    def fold_gates(self) -> None:
        """Multiply the current (evaluation-mode) slice gates into the factors and drop the hook,
        so a method can detach without changing what the tensor computes."""
        if self.slice_gates is None:
            return
        for edge in range(self.num_edges):
            f, d = self.edge_owner(edge)
            view = [1] * self.factors[f].dim()
            view[d] = -1
            self.factors[f].mul_(self.slice_gates(edge).detach().view(view))
        self.slice_gates = None

    @torch.no_grad()
    def reset_parameters(self, std: float) -> None:
        """Gaussian factors scaled so that entries of the full tensor have standard deviation `std`.

        An entry is a sum over all rank indices of products of one entry per
        factor, so Var = prod(rank sizes) * prod(factor variances).
        """
        summed = math.prod(self.max_ranks)
        factor_std = (std**2 / summed) ** (1.0 / (2 * len(self.factors)))
        for f in self.factors:
            f.normal_(0.0, factor_std)

    def decompose_from(self, tensor: torch.Tensor) -> None:
        """Set the factors to a decomposition of `tensor` (shape `modes`) at the current ranks."""
        raise NotImplementedError(f"{type(self).__name__} has no decomposition")

    def extra_repr(self) -> str:
        return f"format={self.format}, modes={self.modes}, ranks={self.ranks}/{self.max_ranks}"
