"""Pareto fronts and hypervolume on plain numpy arrays.

Kept free of pandas/pyarrow so the orchestrator, the reports and the tests can
share one definition of "non-dominated".
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MODES = ("min", "max")


def _as_minimization(values, modes: Sequence[str]) -> np.ndarray:
    """Flip "max" columns so every objective is minimized: one comparison rule everywhere."""
    v = np.array(values, dtype=float, ndmin=2)
    if v.shape[1] != len(modes):
        raise ValueError(f"{v.shape[1]} objective columns but {len(modes)} modes")
    for j, mode in enumerate(modes):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "max":
            v[:, j] = -v[:, j]
    return v


def pareto_mask(values, modes: Sequence[str]) -> np.ndarray:
    """Boolean mask of the non-dominated rows of `values` (n × k).

    a dominates b when a is no worse in every objective and strictly better in
    one, so rows equal in all objectives are all kept. Rows with a NaN or
    infinite value are never on the front (a failed measurement is not a result).
    """
    v = _as_minimization(values, modes)
    mask = np.all(np.isfinite(v), axis=1)
    candidates = v[mask]
    keep = np.ones(len(candidates), dtype=bool)
    for i, row in enumerate(candidates):
        no_worse = np.all(candidates <= row, axis=1)
        better = np.any(candidates < row, axis=1)
        keep[i] = not np.any(no_worse & better)
    mask[mask] = keep
    return mask


def hypervolume(points, ref, modes: Sequence[str] | None = None) -> float:
    """Volume dominated by `points` and bounded by the reference point `ref`.

    Any number of objectives (≥ 1); `modes` defaults to all "min". Points that
    do not strictly beat `ref` in every objective add nothing, and dominated
    points never change the result, so the whole set may be passed, not only
    its front.
    """
    ref = np.asarray(ref, dtype=float).ravel()
    modes = list(modes) if modes is not None else ["min"] * len(ref)
    p = _as_minimization(np.asarray(points, dtype=float).reshape(-1, len(ref)), modes)
    r = _as_minimization(ref, modes)[0]
    return _hv(p[np.all(p < r, axis=1)], r)


def _hv(p: np.ndarray, ref: np.ndarray) -> float:
    """Slice along the last objective and recurse (exact; fronts here are small)."""
    if len(p) == 0:
        return 0.0
    if p.shape[1] == 1:
        return float(ref[0] - p[:, 0].min())
    p = p[np.argsort(p[:, -1], kind="stable")]
    upper = np.append(p[1:, -1], ref[-1])
    return float(sum((upper[i] - p[i, -1]) * _hv(p[: i + 1, :-1], ref[:-1]) for i in range(len(p))))
