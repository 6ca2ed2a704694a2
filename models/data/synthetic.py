"""Synthetic Criteo-like data whose embedding tables are compressible by construction.

Why: to measure what tensorized tables lose, the data must have a known, learnable low-rank
structure, in tables of any size. Each signal table t has a latent table E_t (rows x latent_dim)
that is a tensor train over the id's three mixed-radix digits (most significant first, as
`FactorizedEmbeddingBag` splits ids) with internal ranks (rank, rank):

    E_t[id] = A[i0] @ B[i1] @ C[i2],   id = (i0 * c + i1) * c + i2,   c = ceil(rows ** (1/3))

so a 10^7-row table costs a few thousand numbers and is never materialized, and a TT table of
rank >= `rank` over the same digits represents it exactly. The click probability is

    sigmoid(signal_scale * (pairwise <E_a, E_b> + per-table u_t . E_t + w . z) / sqrt(3) + bias)

over the signal tables (default: the 4 largest), each term scaled to unit variance; z is the
Gaussian behind the dense counts floor(exp(mu + z)). The other tables are Zipf noise, as most
Criteo features are for a given model. Ids are Zipf(zipf_a) by popularity rank, then scattered
over the table ((rank * (2^31 - 1) + offset) mod rows) the way hashing scatters Criteo's ids.
`info["oracle_test_auc"]` is the AUC of the true probabilities on the test split: the ceiling
any model can reach.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from .criteo import NUM_DENSE, NUM_SPARSE, RecData

# 26 tables, 4 of them 10^4..10^5 rows, most small: a dense DLRM on them fits anywhere and trains
# in seconds, while the large ones are worth compressing.
SYNTHETIC_TABLE_SIZES = [
    100_000, 50_000, 20_000, 10_000, 5_000, 2_000, 1_000, 1_000, 500, 500, 200, 200, 100,
    100, 100, 50, 50, 20, 20, 10, 10, 10, 5, 4, 3, 2,
]
_SCATTER_PRIME = 2_147_483_647  # prime and larger than any table, so rank -> id is a bijection


def _digit_base(rows: int) -> int:
    """The smallest c with c ** 3 >= rows: three balanced digits address every row."""
    base = max(2, round(rows ** (1 / 3)))
    while base**3 < rows:
        base += 1
    return base


def _zipf_ranks(rng: np.random.Generator, n: int, rows: int, a: float) -> np.ndarray:
    """Popularity ranks in [0, rows) with P(rank k) ~ (k + 1) ** -a (inverse CDF of a truncated power law)."""
    u = rng.random(n)
    top = rows + 1.0
    if math.isclose(a, 1.0):
        x = top**u
    else:
        x = (1 + u * (top ** (1 - a) - 1)) ** (1 / (1 - a))
    return np.minimum(np.floor(x).astype(np.int64) - 1, rows - 1)


class _TTLatent:
    """The latent table E_t of one signal table, evaluated row by row from three small cores."""

    def __init__(self, rng: np.random.Generator, rows: int, rank: int, latent_dim: int):
        self.base = _digit_base(rows)
        self.a = rng.standard_normal((self.base, rank))
        self.b = rng.standard_normal((self.base, rank, rank)) / math.sqrt(rank)
        self.c = rng.standard_normal((self.base, rank, latent_dim)) / math.sqrt(rank)

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        i0, rest = np.divmod(ids, self.base**2)
        i1, i2 = np.divmod(rest, self.base)
        return np.einsum("nr,nrs,nsk->nk", self.a[i0], self.b[i1], self.c[i2])


def _auc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """ROC AUC by the rank-sum formula (scores are continuous, so ties do not matter); None if one class."""
    positives = int(labels.sum())
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        return None
    ranks = np.empty(len(scores))
    ranks[np.argsort(scores)] = np.arange(1, len(scores) + 1)
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def _check_args(sizes, num_samples, rank, latent_dim, zipf_a, signal_tables, test_fraction):
    if len(sizes) != NUM_SPARSE or min(sizes) < 1:
        raise ValueError(f"table_sizes: expected {NUM_SPARSE} positive sizes, got {sizes!r}")
    for name, value in (("num_samples", num_samples), ("rank", rank), ("latent_dim", latent_dim)):
        if value < 1:
            raise ValueError(f"{name}: expected >= 1, got {value}")
    if zipf_a <= 0:
        raise ValueError(f"zipf_a: expected > 0, got {zipf_a}")
    if len(signal_tables) < 2 or len(set(signal_tables)) != len(signal_tables) or not (
        0 <= min(signal_tables) and max(signal_tables) < NUM_SPARSE
    ):
        raise ValueError(f"signal_tables: expected at least 2 distinct indices in [0, 26), got {signal_tables!r}")
    if not 0 <= test_fraction < 1:
        raise ValueError(f"test_fraction: expected a value in [0, 1), got {test_fraction}")


def synthetic_criteo(
    num_samples: int = 100_000,
    table_sizes: Sequence[int] | None = None,
    *,
    seed: int = 0,
    zipf_a: float = 1.1,
    rank: int = 4,
    latent_dim: int = 8,
    signal_tables: Sequence[int] | None = None,
    signal_scale: float = 2.0,
    bias: float = -1.0,
    test_fraction: float = 0.1,
) -> RecData:
    """Criteo-shaped RecData (13 dense, 26 sparse) with the planted structure described above.

    Deterministic in `seed`; the generating function does not depend on `num_samples`, and a smaller
    data set is a prefix of a larger one. The last round(test_fraction * N) rows are the test split.
    """
    sizes = [int(s) for s in (SYNTHETIC_TABLE_SIZES if table_sizes is None else table_sizes)]
    if signal_tables is None:
        signal_tables = sorted(np.argsort(sizes, kind="stable")[::-1][:4].tolist())
    signal_tables = [int(t) for t in signal_tables]
    _check_args(sizes, num_samples, rank, latent_dim, zipf_a, signal_tables, test_fraction)

    params_seq, dense_seq, label_seq, *table_seqs = np.random.SeedSequence(seed).spawn(3 + NUM_SPARSE)
    params = np.random.default_rng(params_seq)
    latents = [_TTLatent(params, sizes[t], rank, latent_dim) for t in signal_tables]
    readout = params.standard_normal((len(signal_tables), latent_dim)) / math.sqrt(latent_dim)
    dense_weight = params.standard_normal(NUM_DENSE) / math.sqrt(NUM_DENSE)
    dense_mu = params.uniform(0.0, 4.0, NUM_DENSE)
    offsets = params.integers(0, sizes)

    sparse = np.empty((num_samples, NUM_SPARSE), dtype=np.int64)
    for t, seq in enumerate(table_seqs):
        ranks = _zipf_ranks(np.random.default_rng(seq), num_samples, sizes[t], zipf_a)
        sparse[:, t] = (ranks * _SCATTER_PRIME + offsets[t]) % sizes[t]
    z = np.random.default_rng(dense_seq).standard_normal((num_samples, NUM_DENSE))
    dense = np.log1p(np.floor(np.exp(dense_mu + z)))

    embedded = np.stack([latent(sparse[:, t]) for latent, t in zip(latents, signal_tables)], axis=1)  # (N, S, k)
    pairs = [(i, j) for i in range(len(signal_tables)) for j in range(i + 1, len(signal_tables))]
    interaction = sum((embedded[:, i] * embedded[:, j]).sum(1) for i, j in pairs) / math.sqrt(latent_dim * len(pairs))
    main = np.einsum("nsk,sk->n", embedded, readout) / math.sqrt(len(signal_tables))
    signal = (interaction + main + z @ dense_weight) / math.sqrt(3)
    prob = 1 / (1 + np.exp(-(signal_scale * signal + bias)))
    labels = np.random.default_rng(label_seq).random(num_samples) < prob
    num_test = round(test_fraction * num_samples)

    return RecData(
        name="synthetic-criteo",
        dense=torch.from_numpy(dense.astype(np.float32)),
        sparse=torch.from_numpy(sparse),
        labels=torch.from_numpy(labels.astype(np.float32)),
        table_sizes=sizes,
        num_test=num_test,
        info={
            "seed": seed, "zipf_a": zipf_a, "rank": rank, "latent_dim": latent_dim,
            "signal_tables": signal_tables, "signal_scale": signal_scale, "bias": bias,
            "tt_row_shapes": {t: [latent.base] * 3 for latent, t in zip(latents, signal_tables)},
            "oracle_test_auc": _auc(prob[num_samples - num_test :], labels[num_samples - num_test :]),
        },
    )
