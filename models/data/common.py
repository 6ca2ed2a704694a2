"""Pieces every loader shares: the error type and deterministic subsampling."""

from __future__ import annotations

import numpy as np


class DatasetError(ValueError):
    """A data set is missing, malformed or asked for wrongly; the message names the path and what was expected."""


def subsample_indices(n: int, limit: int | None, seed: int) -> np.ndarray:
    """Indices of a seeded random subset of size `limit` (all when None or >= n), in ascending order.

    Ascending order keeps the original sequence (time order for Criteo) within the subset.
    """
    if limit is None or limit >= n:
        return np.arange(n)
    if limit < 0:
        raise ValueError(f"max_train/max_test: expected a count >= 0, got {limit}")
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))
