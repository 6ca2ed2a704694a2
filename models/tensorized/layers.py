"""Drop-in factorized replacements for nn.Linear, nn.Conv2d and nn.EmbeddingBag.

Each layer owns one `FactorizedTensor` (`.weight`) and exposes the shared rank
interface: `ranks`, `max_ranks`, `num_parameters(effective=True)`, `flops`,
`dense_weight()`, `prune()`. Padding from unbalanced shapes is invisible: inputs
are zero-padded, outputs truncated, padded rows never looked up.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .formats import build_tensor
from .names import FORMATS
from .shapes import default_order, resolve_shape
from .pooling import one_id_bags, pool_rows
from .tt_lookup import distinct_ids, fused_row_factors, fused_rows

FUSED_FORMATS = ("tt", "ttm")  # formats with a fused lookup (tt_lookup.py); the others use the einsum path


def _check_common(format: str, **sizes) -> None:
    if format not in FORMATS:
        raise ValueError(f"format: unknown format {format!r}; expected one of {', '.join(FORMATS)}")
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive integer, got {value!r}")


def _paired_shapes(format, rows, cols, row_shape, col_shape, row_arg, col_arg, *, table=False):
    """Row and column mode shapes (explicit ones are validated, missing ones balanced).

    Tucker's core grows as rank**modes, so it keeps feature dimensions whole
    (Tucker-2 on out x in) and splits only table rows. ttm pairs row and column
    modes, so both get the same number. Tables use 3 row modes, as TT-Rec.
    """
    if format == "tucker":
        row_order, col_order = (3 if table else 1), 1
    elif format == "ttm":
        given = [len(s) for s in (row_shape, col_shape) if isinstance(s, (list, tuple))]
        row_order = col_order = given[0] if given else (3 if table else max(default_order(rows), default_order(cols)))
    else:
        row_order = col_order = 3 if table else None
    row, col = resolve_shape(row_arg, row_shape, rows, row_order), resolve_shape(col_arg, col_shape, cols, col_order)
    if format == "ttm" and len(row) != len(col):
        raise ValueError(
            f"{col_arg}: ttm pairs each {row_arg} factor with one {col_arg} factor, so both need the same "
            f"number of factors; got {row_arg}={row} and {col_arg}={col}"
        )
    return row, col


class FactorizedLayer(nn.Module):
    """What every factorized layer shares: rank bookkeeping on `self.weight`."""

    weight: "torch.nn.Module"
    kind = ""

    @property
    def format(self) -> str:
        return self.weight.format

    @property
    def ranks(self) -> list[int]:
        return self.weight.ranks

    @property
    def max_ranks(self) -> list[int]:
        return self.weight.max_ranks

    @property
    def rank_masks(self) -> list[torch.Tensor]:
        return self.weight.masks

    def _bias_params(self) -> int:
        bias = getattr(self, "bias", None)
        return bias.numel() if bias is not None else 0

    def num_parameters(self, effective: bool = True) -> int:
        return self.weight.num_parameters(effective) + self._bias_params()

    def params_at(self, ranks: list[int]) -> int:
        """`num_parameters()` with `ranks` kept per edge, without touching the masks."""
        return self.weight.params_at(ranks) + self._bias_params()

    def dense_parameters(self) -> int:
        """Parameters of the uncompressed layer this one replaces."""
        return math.prod(self.dense_shape) + self._bias_params()

    def prune(self) -> list[torch.Tensor]:
        return self.weight.prune()

    def describe(self) -> dict:
        """One row of the per-layer report."""
        return {
            "kind": self.kind,
            "format": self.format,
            "shape": list(self.dense_shape),
            "tensor_shape": list(self.weight.modes),
            "max_ranks": self.max_ranks,
            "ranks": self.ranks,
            "params": self.num_parameters(),
            "dense_params": self.dense_parameters(),
        }

    def config(self) -> dict:
        """Constructor arguments that rebuild this layer at its current (pruned) ranks."""
        raise NotImplementedError


class FactorizedLinear(FactorizedLayer):
    kind = "linear"

    def __init__(self, in_features, out_features, *, format, max_rank, bias=True, in_shape=None, out_shape=None):
        super().__init__()
        _check_common(format, in_features=in_features, out_features=out_features)
        self.in_features, self.out_features = in_features, out_features
        self.out_shape, self.in_shape = _paired_shapes(
            format, out_features, in_features, out_shape, in_shape, "out_shape", "in_shape"
        )
        self.weight = build_tensor(format, self.out_shape, self.in_shape, max_rank)
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.reset_parameters()

    @property
    def dense_shape(self):
        return (self.out_features, self.in_features)

    def reset_parameters(self, std: float | None = None) -> None:
        """Same variance as nn.Linear's default init unless `std` is given."""
        self.weight.reset_parameters(std if std is not None else 1 / math.sqrt(3 * self.in_features))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def dense_weight(self) -> torch.Tensor:
        w = self.weight.full().reshape(math.prod(self.out_shape), math.prod(self.in_shape))
        return w[: self.out_features, : self.in_features]

    def _modes(self):
        n_out = len(self.out_shape)
        return range(n_out, n_out + len(self.in_shape)), range(n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features)
        pad = math.prod(self.in_shape) - self.in_features
        if pad:
            x = F.pad(x, (0, pad))
        in_modes, out_modes = self._modes()
        y = self.weight.contract_modes(x.reshape(-1, *self.in_shape), in_modes, out_modes)
        y = y.reshape(x.shape[0], -1)[:, : self.out_features]
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def flops(self, batch_size: int) -> int:
        in_modes, out_modes = self._modes()
        return self.weight.flops((batch_size, *self.in_shape), in_modes, out_modes)

    def config(self) -> dict:
        return dict(
            in_features=self.in_features, out_features=self.out_features, format=self.format,
            max_rank=self.max_ranks, bias=self.bias is not None, in_shape=self.in_shape, out_shape=self.out_shape,
        )


class FactorizedConv2d(FactorizedLayer):
    """The kernel (out, in, kh*kw) is factorized; forward builds it and calls conv2d.

    Building the kernel costs far less than contracting factors with every
    spatial position of the activations, so this is the cheap order for convs.
    """

    kind = "conv2d"

    def __init__(self, in_channels, out_channels, kernel_size, *, format, max_rank, stride=1, padding=0,
                 bias=True, dilation=1, in_shape=None, out_shape=None):
        super().__init__()
        _check_common(format, in_channels=in_channels, out_channels=out_channels)
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, (kh, kw)
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.out_shape, self.in_shape = _paired_shapes(
            format, out_channels, in_channels, out_shape, in_shape, "out_shape", "in_shape"
        )
        extra = [kh * kw] if kh * kw > 1 else []
        self.weight = build_tensor(format, self.out_shape, self.in_shape, max_rank, extra)
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    @property
    def dense_shape(self):
        return (self.out_channels, self.in_channels, *self.kernel_size)

    def reset_parameters(self, std: float | None = None) -> None:
        fan_in = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        self.weight.reset_parameters(std if std is not None else 1 / math.sqrt(3 * fan_in))
        if self.bias is not None:
            nn.init.uniform_(self.bias, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))

    def dense_weight(self) -> torch.Tensor:
        kh, kw = self.kernel_size
        w = self.weight.full().reshape(math.prod(self.out_shape), math.prod(self.in_shape), kh * kw)
        return w[: self.out_channels, : self.in_channels].reshape(self.dense_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.dense_weight(), self.bias, self.stride, self.padding, self.dilation)

    def flops(self, batch_size: int, spatial: tuple[int, int] = (32, 32)) -> int:
        """Kernel construction plus the convolution at an output size of `spatial`."""
        conv = batch_size * spatial[0] * spatial[1] * math.prod(self.dense_shape)
        return self.weight.flops() + conv

    def config(self) -> dict:
        return dict(
            in_channels=self.in_channels, out_channels=self.out_channels, kernel_size=self.kernel_size,
            format=self.format, max_rank=self.max_ranks, stride=self.stride, padding=self.padding,
            bias=self.bias is not None, dilation=self.dilation, in_shape=self.in_shape, out_shape=self.out_shape,
        )


class FactorizedEmbeddingBag(FactorizedLayer):
    """nn.EmbeddingBag whose rows are computed from the factors on lookup (TT-Rec style).

    Only the distinct ids of a batch are computed; pooling, offsets and
    per-sample weights then go through F.embedding_bag, so semantics match
    nn.EmbeddingBag exactly. The table itself is never materialized. `tt` and `ttm`
    tables use the fused lookup of `tt_lookup.py` (set `fused = False` for the einsum
    reference); `table_update`, when a table optimizer (`table_optim.py`) sets it, updates
    the touched core slices inside backward.
    """

    kind = "embedding_bag"
    fused = True
    table_update = None

    def __init__(self, num_embeddings, embedding_dim, *, format, max_rank, mode="sum", shape=None,
                 include_last_offset=False):
        super().__init__()
        _check_common(format, num_embeddings=num_embeddings, embedding_dim=embedding_dim)
        if mode not in ("sum", "mean", "max"):
            raise ValueError(f"mode: expected 'sum', 'mean' or 'max', got {mode!r}")
        if shape is not None and (not isinstance(shape, (list, tuple)) or len(shape) != 2):
            raise ValueError(f"shape: expected [row_factors, dim_factors], got {shape!r}")
        row_shape, col_shape = shape if shape is not None else (None, None)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.mode, self.include_last_offset = mode, include_last_offset
        self.row_shape, self.col_shape = _paired_shapes(
            format, num_embeddings, embedding_dim, row_shape, col_shape, "shape[0]", "shape[1]", table=True
        )
        self.weight = build_tensor(format, self.row_shape, self.col_shape, max_rank)
        self.reset_parameters()

    @property
    def dense_shape(self):
        return (self.num_embeddings, self.embedding_dim)

    def reset_parameters(self, std: float | None = None) -> None:
        """DLRM's uniform(-1/sqrt(N), 1/sqrt(N)) variance (as TT-Rec) unless `std` is given."""
        self.weight.reset_parameters(std if std is not None else 1 / math.sqrt(3 * self.num_embeddings))

    def _digits(self, ids: torch.Tensor) -> dict[int, torch.Tensor]:
        digits, stride = {}, 1
        for k in reversed(range(len(self.row_shape))):
            digits[k] = torch.div(ids, stride, rounding_mode="floor") % self.row_shape[k]
            stride *= self.row_shape[k]
        return digits

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of the (virtual) table for 1-D `ids`: (len(ids), embedding_dim)."""
        _, col_modes = self._mode_ranges()
        out = self.weight.gather_rows(self._digits(ids), col_modes)
        return out.reshape(ids.shape[0], math.prod(self.col_shape))[:, : self.embedding_dim]  # 0 ids is fine

    def _fused(self) -> bool:
        return self.fused and self.format in FUSED_FORMATS

    def distinct(self, ids: torch.Tensor):
        """(unique, inverse, prefix tree or None) of 1-D ids: the tree comes with the sort on the fused path."""
        if self._fused():
            return distinct_ids(ids, self.row_shape)
        return *torch.unique(ids, return_inverse=True), None

    def distinct_rows(self, unique: torch.Tensor, tree=None) -> torch.Tensor:
        """`rows` for distinct sorted ids (torch.unique's output): the fused path where there is one."""
        if self._fused():
            return fused_rows(self.weight, unique, self.row_shape, self.table_update, tree)[:, : self.embedding_dim]
        return self.rows(unique)

    def dense_weight(self) -> torch.Tensor:
        """The whole (num_embeddings, embedding_dim) table: for tests and export of SMALL tables only."""
        w = self.weight.full().reshape(math.prod(self.row_shape), math.prod(self.col_shape))
        return w[: self.num_embeddings, : self.embedding_dim]

    def _check_ids(self, ids: torch.Tensor) -> None:
        if ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input: expected an integer tensor of ids, got dtype {ids.dtype}")
        if ids.numel():
            low, high = (int(v) for v in torch.aminmax(ids))
            if low < 0 or high >= self.num_embeddings:
                raise ValueError(f"input: ids must lie in [0, {self.num_embeddings}), got range [{low}, {high}]")

    def lookup(self, input: torch.Tensor) -> torch.Tensor:
        """nn.Embedding semantics: rows for ids of any shape, (..., embedding_dim)."""
        self._check_ids(input)
        unique, inverse, tree = self.distinct(input.reshape(-1))
        if self._fused():  # one row per lookup, written by the fused lookup itself
            rows = fused_rows(self.weight, unique, self.row_shape, self.table_update, tree, inverse)
            return rows[:, : self.embedding_dim].reshape(*input.shape, self.embedding_dim)
        return self.rows(unique)[inverse].reshape(*input.shape, self.embedding_dim)

    def forward(self, input, offsets=None, per_sample_weights=None):
        self._check_ids(input)
        include_last_offset = self.include_last_offset
        if input.dim() == 2:
            if offsets is not None:
                raise ValueError("offsets: must be None when input is 2-D (bags of equal length)")
            bags, length = input.shape
            offsets = torch.arange(0, bags * length, length, device=input.device)
            include_last_offset = False  # as nn.EmbeddingBag: the implicit offsets have no last entry
            input = input.reshape(-1)
            per_sample_weights = None if per_sample_weights is None else per_sample_weights.reshape(-1)
        elif input.dim() != 1 or offsets is None:
            raise ValueError("input: expected 2-D (bags, length), or 1-D ids together with offsets")
        if per_sample_weights is not None and self.mode != "sum":
            raise ValueError(f"per_sample_weights: only supported with mode='sum', this bag uses {self.mode!r}")
        unique, inverse, tree = self.distinct(input)
        if self._fused() and per_sample_weights is None and one_id_bags(offsets, input.numel(), include_last_offset):
            # every bag one id (DLRM's features): the lookup writes each bag's row itself, no pooling
            pooled, tail = fused_row_factors(self.weight, unique, self.row_shape, self.table_update, tree, inverse)
        else:
            rows, tail = self._pooling_factors(unique, tree)
            pooled = pool_rows(rows, inverse, offsets, self.mode, per_sample_weights, include_last_offset)
        return pooled[:, : self.embedding_dim] if tail is None else tail(pooled, self.embedding_dim)

    def _pooling_factors(self, unique: torch.Tensor, tree=None):
        """(rows to pool, tail applied after pooling or None). A fused tt table's rows are
        tail((U, r_L)): sum and mean pool the r_L-wide rows, and the tail multiplies once per bag
        (at rank 16, dim 128, pooling moved 8x less data: it was half of a training step)."""
        if self.fused and self.format == "tt" and self.mode != "max":
            return fused_row_factors(self.weight, unique, self.row_shape, self.table_update, tree)
        return self.distinct_rows(unique, tree), None

    def _mode_ranges(self):
        n_rows = len(self.row_shape)
        return range(n_rows), range(n_rows, n_rows + len(self.col_shape))

    def flops(self, batch_size: int) -> int:
        """Multiply-adds to compute `batch_size` rows (before pooling)."""
        row_modes, col_modes = self._mode_ranges()
        return self.weight.row_flops(batch_size, row_modes, col_modes)

    def config(self) -> dict:
        return dict(
            num_embeddings=self.num_embeddings, embedding_dim=self.embedding_dim, format=self.format,
            max_rank=self.max_ranks, mode=self.mode, shape=[self.row_shape, self.col_shape],
            include_last_offset=self.include_last_offset,
        )


class FactorizedEmbedding(FactorizedEmbeddingBag):
    """nn.Embedding semantics (`forward(ids)` -> rows) over the same factorized table."""

    kind = "embedding"

    def forward(self, input):
        return self.lookup(input)
