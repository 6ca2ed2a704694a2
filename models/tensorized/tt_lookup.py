"""Fused TT / TTM row lookup: distinct ids only, shared prefix products, one autograd node.

The generic einsum path (`FactorizedTensor.gather_rows`) indexes every core per lookup and lets
autograd differentiate a chain of per-lookup copies; on a 10^6 x 128 rank-16 table it ran at 2-3 %
of what the FLOPs allow. This path follows EL-Rec (SC'22):

- the batch's distinct ids (sorted) form a prefix tree over the row digits (i_1, ..., i_L); the
  partial product of the leading cores is computed once per distinct prefix, each level one
  batched GEMM over that level's nodes (left to right, the cheap order for TT-Rec layouts:
  the running product stays (d_1...d_k, r_k) instead of (r_{k-1}, d_k...d_L));
- backward walks the tree from the leaves up, summing each node's gradient into its parent
  before the parent's GEMM and each core slice's gradient over every node that used it, so the
  cores receive one gradient per distinct (level, digit), never one per lookup;
- with a table optimizer attached (`table_optim.py`), backward hands the touched core slices'
  gradients to it (it updates them when the backward pass ends) and autograd no core gradient
  at all (TT-Rec / FBGEMM's fused backward-optimizer), so the step costs in proportion to the
  batch;
- the compiled kernel reads the cores where they lie, without a per-step copy; backward reads
  them again, unchanged, since the optimizer waits for the end of the pass.

Layouts: a TTM table has L cores (r_{k-1}, n_k, d_k, r_k); a TT table has L row cores
(r_{k-1}, n_k, r_k) then column cores whose product (r_L, D) is a shared `tail` matrix (it does
not depend on the ids; a bag sums its r_L-wide rows before the tail, 8x less pooling traffic than
128-wide rows at rank 16; `Tail` multiplies, with its own backward that reads the output gradient
once and hands the column cores' gradients to the optimizer itself, and multiplies a repeated id
once). Masks,
`slice_gates` and `factor_sampler` are applied to the cores before the lookup (`lookup_cores`), so
every rank method keeps driving these tables; only the plain case (no gate, all masks on) takes
the fused optimizer, the others hand dense core gradients to autograd.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from . import tt_kernel


@dataclass
class PrefixTree:
    """Level k holds the distinct prefixes (i_1..i_k) of the ids: their digit i_k and parent."""

    digits: list[torch.Tensor]  # per level: digit of each node, (P_k,)
    parents: list[torch.Tensor]  # per level k >= 1: index of each node's parent in level k-1
    sizes: list[int]  # P_k
    # the batch's lookups grouped by distinct id: id u at positions order[bounds[u]:bounds[u+1]]
    order: torch.Tensor | None = None
    bounds: torch.Tensor | None = None

    def group_lookups(self, inverse: torch.Tensor) -> None:
        """order/bounds from torch.unique's inverse, where the kernel's prefix_tree did not give them."""
        if self.order is None:
            self.order = torch.argsort(inverse, stable=True)
            counts = torch.bincount(inverse, minlength=self.sizes[-1])
            self.bounds = torch.cat([counts.new_zeros(1), counts.cumsum(0)])

    @classmethod
    def of(cls, ids: torch.Tensor, row_shape) -> "PrefixTree":
        """`ids` distinct and sorted (torch.unique's output): every level is a consecutive unique."""
        ids = ids.long()  # int32 ids (nn.EmbeddingBag takes both): the kernel indexes with int64
        strides = [math.prod(row_shape[k + 1 :]) for k in range(len(row_shape))]
        digits, parents, sizes = [], [], []
        for k, (n, s) in enumerate(zip(row_shape, strides)):
            keys = ids if s == 1 else torch.div(ids, s, rounding_mode="floor")
            if s != 1:
                keys = torch.unique_consecutive(keys)
            digits.append(keys % n)
            if k:
                parents.append(torch.unique_consecutive(keys // n, return_inverse=True)[1])
            sizes.append(int(keys.numel()))
        return cls(digits, [torch.empty(0, dtype=torch.long)] + parents, sizes)


def distinct_ids(ids: torch.Tensor, row_shape) -> tuple[torch.Tensor, torch.Tensor, PrefixTree | None]:
    """torch.unique(ids, return_inverse=True), and on CPU with the compiled kernel the prefix tree
    too, from one radix sort and one pass (0.55 -> 0.18 ms at 8,192 ids); None: build it later."""
    module = tt_kernel.kernel() if ids.device.type == "cpu" else None
    if module is None:
        unique, inverse = torch.unique(ids, return_inverse=True)
        return unique, inverse, None
    levels = len(row_shape)
    unique, inverse, order, bounds, *rest = module.prefix_tree(ids, [int(n) for n in row_shape])
    digits, parents = rest[:levels], rest[levels:]
    tree = PrefixTree(digits, [torch.empty(0, dtype=torch.long)] + parents[1:], [int(d.numel()) for d in digits],
                      order, bounds)
    return unique.to(ids.dtype), inverse, tree


def _core_blocks(core: torch.Tensor) -> torch.Tensor:
    """Core (r_{k-1}, n_k, [d_k,] r_k) as (n_k, r_{k-1}, d_k * r_k): one GEMM operand per digit
    (the PyTorch path; the kernel reads the cores where they lie, `_slabs`)."""
    return _slabs(core).transpose(0, 1).contiguous()


def _slabs(core: torch.Tensor) -> torch.Tensor:
    """Core (r_{k-1}, n_k, [d_k,] r_k) as (r_{k-1}, n_k, d_k * r_k), a view of a contiguous core:
    digit j's block is column range [j W, (j + 1) W) of each slab, as the kernel reads it."""
    return core.reshape(core.shape[0], core.shape[1], -1).contiguous()


class _FusedLookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tree, shapes, update, inverse, *cores):
        """Rows of the distinct ids in `tree` over the row cores: ttm (U, D); tt (U, r_L), the rows
        before the tail. shapes: per level (r_{k-1}, d_k, r_k). With `inverse` (each lookup's
        distinct id) one row per lookup instead, (len(inverse), ...): the kernel writes them
        directly and reads their gradients back, no distinct-row intermediate either way."""
        compiled = tt_kernel.usable(cores[0])
        per_lookup = inverse is not None
        lookups = (None, None)
        if compiled:  # cores read in place, and again in backward: a fused optimizer waits for the pass's end
            operands = [_slabs(c) for c in cores]
            if per_lookup:
                tree.group_lookups(inverse)
                lookups = (tree.order, tree.bounds)
            nodes = tt_kernel.kernel().forward(operands, tree.digits, _parents(tree), *lookups)
            out = nodes[-1]
        else:
            operands = [_core_blocks(c) for c in cores]
            nodes = _forward_torch(tree, operands, shapes)
            out = nodes[-1].reshape(tree.sizes[-1], -1)
            if per_lookup:
                out = out.index_select(0, inverse)
        ctx.tree, ctx.update, ctx.compiled, ctx.inverse, ctx.lookups = tree, update, compiled, inverse, lookups
        ctx.cores, ctx.n_nodes = (cores if update is not None else None), len(nodes)
        ctx.core_shapes = [c.shape for c in cores]
        ctx.save_for_backward(*nodes, *operands)
        return out.reshape(out.shape[0], -1)

    @staticmethod
    def backward(ctx, grad_out):
        tree, levels = ctx.tree, len(ctx.core_shapes)
        saved = ctx.saved_tensors
        nodes, operands = saved[: ctx.n_nodes], saved[ctx.n_nodes : ctx.n_nodes + levels]
        g = grad_out.contiguous()
        if ctx.compiled:  # the touched digits of each level and their slices' gradients (r_{k-1}, T_k, W_k)
            out = tt_kernel.kernel().backward(g, list(nodes), list(operands), tree.digits, _parents(tree), *ctx.lookups)
            slice_grads, touched = out[:levels], out[levels:]
        else:  # every digit's (touched None)
            if ctx.inverse is not None:  # per-lookup rows: sum each distinct id's lookups
                g = g.new_zeros(tree.sizes[-1], g.shape[1]).index_add_(0, ctx.inverse, g)
            slice_grads, touched = _backward_torch(tree, nodes, operands, g), [None] * levels
        grads = []
        for k, (digits, grad) in enumerate(zip(touched, slice_grads)):
            if not ctx.needs_input_grad[4 + k]:
                grads.append(None)
                continue
            shape = ctx.core_shapes[k]
            grad = grad.reshape(shape[0], -1, *shape[2:])  # (r_{k-1}, T or n_k, [d_k,] r_k)
            if ctx.update is not None:  # the fused optimizer: touched slices only, no gradient for autograd
                if digits is None:
                    digits = torch.bincount(tree.digits[k], minlength=shape[1]).nonzero().flatten()  # sorted, no sort
                    grad = grad.index_select(1, digits)
                ctx.update(ctx.cores[k], digits, grad)
                grads.append(None)
            elif digits is None:
                grads.append(grad)
            else:
                grads.append(grad.new_zeros(shape).index_copy_(1, digits, grad))
        return (None, None, None, None, *grads)


def _parents(tree) -> list[torch.Tensor]:
    return [tree.digits[0] if k == 0 else p for k, p in enumerate(tree.parents)]  # level 0: unused


def _forward_torch(tree, blocks, shapes):
    """The same with one batched GEMM per level; saves the gathered operands (a, b) per level."""
    x = blocks[0].index_select(0, tree.digits[0]).reshape(tree.sizes[0], shapes[0][1], shapes[0][2])
    saved = []
    for k in range(1, len(blocks)):
        a = x.index_select(0, tree.parents[k])  # (P_k, D_{k-1}, r_{k-1})
        b = blocks[k].index_select(0, tree.digits[k])  # (P_k, r_{k-1}, d_k r_k)
        saved += [a, b]
        x = torch.bmm(a, b).reshape(tree.sizes[k], -1, shapes[k][2])
    return saved + [x] if len(blocks) > 1 else [x]


def _backward_torch(tree, saved, blocks, g):
    """Dense gradients of every digit's slices, (r_{k-1}, n_k, W_k) per level, leaves to root."""
    levels = len(blocks)
    out = [None] * levels
    for k in range(levels - 1, 0, -1):
        a, b = saved[2 * (k - 1)], saved[2 * (k - 1) + 1]
        gx = g.reshape(tree.sizes[k], a.shape[1], b.shape[2])  # (P_k, D_{k-1}, d_k r_k)
        out[k] = torch.zeros_like(blocks[k]).index_add_(0, tree.digits[k], torch.bmm(a.transpose(1, 2), gx))
        ga = torch.bmm(gx, b.transpose(1, 2))  # (P_k, D_{k-1}, r_{k-1})
        g = ga.new_zeros(tree.sizes[k - 1], *ga.shape[1:]).index_add_(0, tree.parents[k], ga)
    out[0] = torch.zeros_like(blocks[0]).index_add_(0, tree.digits[0], g.reshape(tree.sizes[0], 1, -1))
    return [grad.transpose(0, 1) for grad in out]


# distinct ids / lookups under which a tt table's tail multiplies each distinct row once and scatters
# it to the lookups (Tail.lookups), instead of multiplying every lookup's row in order: at 10^6 x 128,
# rank 16, 8,192 one-id bags, Zipf ids (0.40 distinct) 3.1 -> 2.3-2.6 ms per step, uniform ids (1.0)
# 3.3-3.6 -> 3.7-3.9 ms (scattered 512-byte rows both ways); break-even near 0.8 by linear interpolation
TAIL_PER_ID_BELOW = 0.75


def _tail_chain(col_cores: list[torch.Tensor]) -> list[torch.Tensor]:
    """Partial products of a TT table's column cores (r_L, d_1, r) ... (r, d_M, 1): entry j is
    (r_L d_1 ... d_j, r_j); the last, reshaped (r_L, D), is the tail."""
    chain = [col_cores[0].reshape(col_cores[0].shape[0] * col_cores[0].shape[1], -1)]
    for core in col_cores[1:]:
        chain.append(torch.mm(chain[-1], core.reshape(core.shape[0], -1)).view(-1, core.shape[-1]))
    return chain


def _tail_chain_grads(col_cores, chain, grad_tail: torch.Tensor) -> list[torch.Tensor]:
    """Gradients of the column cores from the tail's, back through `_tail_chain`."""
    grads = [None] * len(col_cores)
    g = grad_tail
    for j in range(len(col_cores) - 1, 0, -1):
        core, a = col_cores[j], chain[j - 1]
        g = g.reshape(a.shape[0], -1)  # (r_L d_1..d_{j-1}, d_j r_j)
        grads[j] = torch.mm(a.t(), g).view(core.shape)
        g = torch.mm(g, core.reshape(core.shape[0], -1).t())
    grads[0] = g.reshape(col_cores[0].shape)
    return grads


class _TailProduct(torch.autograd.Function):
    """rows (B, r_L) @ tail[:, :width], tail (r_L, D) the product of a tt table's column cores.

    Backward reads the output gradient once (the compiled kernel's `tail_backward` forms the rows'
    and the tail's gradients per L1-sized block of it, where autograd's two GEMMs read all of it
    twice: the largest products of a tt lookup, 16 x 128 per row at rank 16), then takes the tail's
    gradient back to the column cores by hand and, with a fused table optimizer, updates them there
    like the row cores (autograd's chain of small GEMMs, accumulate nodes and hooks cost 0.3-0.5 ms
    of a 4 ms step at 8,192 lookups)."""

    @staticmethod
    def forward(ctx, rows, spec, width, *col_cores):
        chain = _tail_chain(col_cores)
        tail = chain[-1].view(col_cores[0].shape[0], -1)
        ctx.spec, ctx.chain, ctx.full_width = spec, chain, tail.shape[1]
        if width is not None and width < tail.shape[1]:
            tail = tail[:, :width]
        ctx.save_for_backward(rows, tail, *col_cores)
        ctx.compiled = tt_kernel.usable(rows) and rows.dtype == tail.dtype
        if ctx.compiled:
            return tt_kernel.kernel().tail_forward(rows, tail, *spec.lookups)
        if spec.lookups[0] is not None:
            raise RuntimeError("Tail: rows per lookup need the compiled kernel")  # fused_row_factors checks
        return rows @ tail

    @staticmethod
    def backward(ctx, grad_out):
        rows, tail, *col_cores = ctx.saved_tensors
        g = grad_out.contiguous()
        if ctx.compiled and g.dtype == rows.dtype:
            grad_rows, grad_tail = tt_kernel.kernel().tail_backward(g, rows, tail, *ctx.spec.lookups)
        else:
            grad_rows, grad_tail = g @ tail.t(), rows.t() @ g
        grads = [None] * len(col_cores)
        if any(ctx.needs_input_grad[3:]) and rows.shape[0]:  # no lookup, no update (as with a sparse gradient)
            if grad_tail.shape[1] < ctx.full_width:  # padded columns: no gradient
                grad_tail = torch.nn.functional.pad(grad_tail, (0, ctx.full_width - grad_tail.shape[1]))
            grads = _tail_chain_grads(col_cores, ctx.chain, grad_tail)
            if ctx.spec.update is not None:  # the fused optimizer: every slice of a column core is touched
                for core, grad in zip(col_cores, grads):
                    ctx.spec.update(core, torch.arange(grad.shape[1], device=grad.device), grad)
                grads = [None] * len(col_cores)
        return (grad_rows if ctx.needs_input_grad[0] else None), None, None, *grads


@dataclass
class Tail:
    """A tt table's column cores, applied to rows of width r_L (`tail(rows, width)`): pooling may sum
    r_L-wide rows first and multiply once per bag. `update`: the fused table optimizer (plain cores
    only). `lookups` (order, bounds of a PrefixTree; compiled kernel only): the rows are distinct
    ids and the output has one row per lookup, so a repeated id is multiplied once."""

    cores: list[torch.Tensor]
    update: Callable | None = None
    lookups: tuple = (None, None)

    def __call__(self, rows: torch.Tensor, width: int | None = None) -> torch.Tensor:
        return _TailProduct.apply(rows, self, width, *self.cores)


def fused_rows(tensor, ids: torch.Tensor, row_shape, update=None, tree: PrefixTree | None = None,
               inverse: torch.Tensor | None = None) -> torch.Tensor:
    """Rows (len(ids), prod(col modes)) of a `tt`/`ttm` tensor for distinct sorted `ids`.

    `update(core, touched_digits, grad_slices)`: the fused table optimizer (plain cores only);
    `tree`: the ids' prefix tree when `distinct_ids` built it already; `inverse`: return one row
    per lookup, `rows[inverse]` (bags of one id need no pooling then).
    """
    rows, tail = fused_row_factors(tensor, ids, row_shape, update, tree, inverse)
    return rows if tail is None else tail(rows)


def fused_row_factors(tensor, ids: torch.Tensor, row_shape, update=None, tree: PrefixTree | None = None,
                      inverse: torch.Tensor | None = None):
    """(rows, tail): the rows of `ids` are `tail(rows)` for a tt tensor (rows (U, r_L) from the
    row cores, `Tail` of the column cores), `rows` itself (tail None) for ttm. Linear pooling may
    sum the r_L-wide rows first and apply the tail once per bag."""
    cores, plain = lookup_cores(tensor)
    levels = len(row_shape)
    update = update if plain else None
    tree = tree if tree is not None else PrefixTree.of(ids, row_shape)
    if tensor.format == "tt":
        row_cores, tail = cores[:levels], Tail(cores[levels:], update)
        shapes = [(c.shape[0], 1, c.shape[2]) for c in row_cores]
        if (inverse is not None and 0 < ids.numel() <= TAIL_PER_ID_BELOW * inverse.numel()
                and tt_kernel.usable(row_cores[0])):
            # many repeated ids: the kernel's tail multiplies each distinct row once and writes it to
            # each of its lookups (see Tail)
            tree.group_lookups(inverse)
            tail.lookups = (tree.order, tree.bounds)
            return _FusedLookup.apply(tree, shapes, update, None, *row_cores), tail
    else:
        row_cores, tail = cores, None
        shapes = [(c.shape[0], c.shape[2], c.shape[3]) for c in row_cores]
    if ids.numel() == 0:
        width = shapes[-1][2] if tail is not None else math.prod(s[1] for s in shapes)
        return (row_cores[0].sum() * 0).expand(0, width), tail  # keeps the graph: backward gives zeros
    if levels < 2 and inverse is not None:  # one level: rows per distinct id, then the gather
        return _FusedLookup.apply(tree, shapes, update, None, *row_cores)[inverse], tail
    return _FusedLookup.apply(tree, shapes, update, inverse, *row_cores), tail


def lookup_cores(tensor) -> tuple[list[torch.Tensor], bool]:
    """The cores a lookup multiplies: the parameters themselves when no mask, gate or sampler
    changes them (then a fused optimizer may update them in place), else `effective_factors()`."""
    sampling = tensor.factor_sampler is not None and tensor.training
    if tensor.slice_gates is None and not sampling and tensor.all_masks_on():
        return tensor.factor_list(), True
    return tensor.effective_factors(), False
