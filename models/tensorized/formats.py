"""The four formats as factor layouts over `FactorizedTensor`, plus their decompositions.

Modes are ordered rows (out features / table rows), then columns (in features /
embedding dims), then extra modes (a conv kernel). TTM pairs row mode k with
column mode k in core k; TT gives every mode its own core.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import tensorly
import torch
from tensorly.decomposition import parafac

from .factorized import FactorizedTensor
from .names import FORMATS


def _edge_sizes(max_rank, caps: Sequence[int], argument: str = "max_rank") -> list[int]:
    """Per-edge max ranks: an int for all edges (capped where a larger rank is useless) or a list."""
    explicit = isinstance(max_rank, (list, tuple))
    if explicit and len(max_rank) != len(caps):
        raise ValueError(f"{argument}: expected {len(caps)} ranks (one per rank edge), got {len(max_rank)}")
    ranks = list(max_rank) if explicit else [max_rank] * len(caps)
    for r in ranks:
        if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r < 1:
            raise ValueError(f"{argument}: ranks must be integers >= 1, got {max_rank!r}")
    return [int(r) if explicit else int(min(r, c)) for r, c in zip(ranks, caps)]


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to(torch.float64).cpu().numpy()


def _assign(factor: torch.nn.Parameter, value) -> None:
    with torch.no_grad():
        factor.copy_(torch.as_tensor(np.asarray(value), dtype=factor.dtype))


class CP(FactorizedTensor):
    """Sum of R rank-one tensors: one (mode, R) matrix per mode; one rank edge, R slices."""

    format = "cp"

    def __init__(self, modes: Sequence[int], max_rank):
        (rank,) = _edge_sizes(max_rank, [10**9])
        super().__init__(modes, [[("mode", n), ("edge", 0)] for n in range(len(modes))], [rank])

    def decompose_from(self, tensor: torch.Tensor) -> None:
        rank = self.max_ranks[0]
        weights, factors = parafac(_numpy(tensor), rank=rank, init="random", n_iter_max=200, random_state=0)
        factors = [np.array(f) for f in factors]
        factors[0] = factors[0] * np.asarray(weights)[None, :]
        # spread the scale evenly over factors: balanced factors train better than one huge one
        norms = np.stack([np.linalg.norm(f, axis=0) + 1e-12 for f in factors])
        geo = np.exp(np.log(norms).mean(axis=0))
        for f, n, param in zip(factors, norms, self.factors):
            _assign(param, f / n * geo)


class Tucker(FactorizedTensor):
    """A small core times one (mode, R_n) factor matrix per mode; edge n = columns of factor n."""

    format = "tucker"

    def __init__(self, modes: Sequence[int], max_rank):
        ranks = _edge_sizes(max_rank, list(modes))
        n = len(modes)
        labels = [[("mode", i), ("edge", i)] for i in range(n)] + [[("edge", i) for i in range(n)]]
        super().__init__(modes, labels, ranks)

    def slice_members(self, edge: int) -> list[tuple[int, int]]:
        return [(edge, 1)]  # the core is shared by every edge: priors and penalties cover factor columns

    def decompose_from(self, tensor: torch.Tensor) -> None:
        """Truncated HOSVD."""
        t = _numpy(tensor)
        mats = []
        for n, rank in enumerate(self.max_ranks):
            unfolded = np.moveaxis(t, n, 0).reshape(t.shape[n], -1)
            u, _, _ = np.linalg.svd(unfolded, full_matrices=False)
            mats.append(np.pad(u[:, :rank], ((0, 0), (0, max(0, rank - u.shape[1])))))
        core = tensorly.tenalg.multi_mode_dot(t, mats, transpose=True)
        for param, m in zip(self.factors, mats):
            _assign(param, m)
        _assign(self.factors[len(mats)], core)


class TensorTrain(FactorizedTensor):
    """A chain of cores (r_{k-1}, *group_k modes, r_k); edge k joins core k and core k+1."""

    def __init__(self, modes: Sequence[int], groups: Sequence[Sequence[int]], max_rank, format: str):
        self.format = format
        self.groups = [list(g) for g in groups]
        sizes = [math.prod(modes[i] for i in g) for g in self.groups]
        caps = [min(math.prod(sizes[: k + 1]), math.prod(sizes[k + 1 :])) for k in range(len(sizes) - 1)]
        ranks = _edge_sizes(max_rank, caps)
        d = len(self.groups)
        labels = []
        for k, group in enumerate(self.groups):
            left = ("one", 0) if k == 0 else ("edge", k - 1)
            right = ("one", 1) if k == d - 1 else ("edge", k)
            labels.append([left] + [("mode", i) for i in group] + [right])
        super().__init__(modes, labels, ranks)

    def decompose_from(self, tensor: torch.Tensor) -> None:
        """TT-SVD (Oseledets 2011) over the core groups, truncated to the current ranks."""
        order = [i for g in self.groups for i in g]
        sizes = [math.prod(self.modes[i] for i in g) for g in self.groups]
        rest = _numpy(tensor).transpose(order).reshape(sizes)
        ranks = [1] + self.max_ranks + [1]
        for k, param in enumerate(self.factors):
            if k == len(self.factors) - 1:
                core = rest.reshape(ranks[k], sizes[k], 1)
            else:
                u, s, vt = np.linalg.svd(rest.reshape(ranks[k] * sizes[k], -1), full_matrices=False)
                r = ranks[k + 1]
                u, s, vt = u[:, :r], s[:r], vt[:r]
                pad = r - len(s)
                core = np.pad(u, ((0, 0), (0, pad))).reshape(ranks[k], sizes[k], r)
                rest = np.pad(s[:, None] * vt, ((0, pad), (0, 0)))
            _assign(param, core.reshape(param.shape))


def build_tensor(format: str, row_modes, col_modes, max_rank, extra_modes=()) -> FactorizedTensor:
    """The factorized tensor of shape row_modes + col_modes + extra_modes in `format`."""
    modes = list(row_modes) + list(col_modes) + list(extra_modes)
    if format == "cp":
        return CP(modes, max_rank)
    if format == "tucker":
        return Tucker(modes, max_rank)
    if format == "tt":
        return TensorTrain(modes, [[i] for i in range(len(modes))], max_rank, "tt")
    if format == "ttm":
        d = len(row_modes)
        if len(col_modes) != d:
            raise ValueError(
                f"shape: ttm pairs row and column modes, so both need the same number of factors; "
                f"got {list(row_modes)} and {list(col_modes)}"
            )
        groups = [[k, d + k] for k in range(d)] + [[2 * d + j] for j in range(len(extra_modes))]
        return TensorTrain(modes, groups, max_rank, "ttm")
    raise ValueError(f"format: unknown format {format!r}; expected one of {', '.join(FORMATS)}")
