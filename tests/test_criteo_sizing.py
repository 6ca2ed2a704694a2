"""Criteo table sizes from the data: distinct ids of the training rows per feature, an extra row
for ids unseen there, `max_table_rows` hashing beyond a cap, the streaming pass equal to the
materialized one; Kaggle sizes only when asked for."""

import numpy as np
import pytest

from ranksearch.models.data import load_dataset
from ranksearch.models.data.criteo import (
    KAGGLE_TABLE_SIZES, NUM_DENSE, NUM_SPARSE, criteo_vocab, iter_criteo_batches, load_criteo,
)
from ranksearch.models.data.criteo_vocab import TableVocab

from test_data_criteo import good_lines, write_lines


def _raw(fields):
    """Raw ids per line as the spec says: int(hex, 16), empty -> 0."""
    return np.array([[int(h, 16) if h else 0 for h in f[1 + NUM_DENSE :]] for f in fields], dtype=np.int64)


def test_auto_sizes_are_the_distinct_training_ids(tmp_path):
    fields, lines = good_lines(50, seed=7)
    path = write_lines(tmp_path / "t.tsv", lines)
    data = load_criteo(path, test_fraction=0.2)  # auto is the default
    raw = _raw(fields)
    train, test = raw[:40], raw[40:]
    assert data.table_sizes == [len(np.unique(train[:, k])) + 1 for k in range(NUM_SPARSE)]
    assert data.table_sizes != KAGGLE_TABLE_SIZES and max(data.table_sizes) <= 41
    sparse = data.sparse.numpy()
    for k in range(NUM_SPARSE):
        n = data.table_sizes[k]
        assert sparse[:, k].min() >= 0 and sparse[:, k].max() < n
        # one row per distinct training id, no collisions: rows and raw ids pair up one to one
        pairs = set(zip(train[:, k].tolist(), sparse[:40, k].tolist()))
        assert len(pairs) == len({a for a, _ in pairs}) == len({b for _, b in pairs}) == n - 1
        unseen = ~np.isin(test[:, k], train[:, k])
        assert (sparse[40:, k][unseen] == n - 1).all()  # test-only ids share the extra row
        seen_rows = dict(pairs)
        assert all(sparse[40 + i, k] == seen_rows[v] for i, v in enumerate(test[:, k]) if v in seen_rows)
    assert data.info["table_sizes"] == "auto" and data.info["hashed_features"] == []


def test_max_table_rows_hashes_features_beyond_the_cap(tmp_path):
    fields, lines = good_lines(60, seed=8)
    path = write_lines(tmp_path / "t.tsv", lines)
    data = load_criteo(path, test_fraction=0, max_table_rows=20)
    raw = _raw(fields)
    for k in range(NUM_SPARSE):
        distinct = len(np.unique(raw[:, k]))
        if distinct + 1 > 20:
            assert data.table_sizes[k] == 20
            assert data.sparse[:, k].tolist() == (raw[:, k] % 20).tolist()
        else:
            assert data.table_sizes[k] == distinct + 1
    assert data.info["hashed_features"]  # random 8-digit ids: most features pass 20
    fixed = load_criteo(path, test_fraction=0, table_sizes="kaggle", max_table_rows=1000)
    assert fixed.table_sizes == [min(s, 1000) for s in KAGGLE_TABLE_SIZES]
    with pytest.raises(ValueError, match="max_table_rows: expected a positive integer"):
        load_criteo(path, max_table_rows=0)


def test_streaming_vocab_equals_the_materialized_sizing(tmp_path):
    _, lines = good_lines(300, seed=9)
    path = write_lines(tmp_path / "t.tsv", lines)
    data = load_criteo(path, test_fraction=0, max_table_rows=150)
    vocab = criteo_vocab(path, max_table_rows=150)
    assert vocab.sizes == data.table_sizes
    batches = list(iter_criteo_batches(path, vocab, 64))
    streamed = np.concatenate([b.sparse.values().reshape(NUM_SPARSE, -1).t().numpy() for b in batches])
    assert (streamed == data.sparse.numpy()).all()


def test_distinct_counting_over_many_chunks():
    rng = np.random.default_rng(0)
    chunks = [rng.integers(0, 5000, (300, 3)) for _ in range(400)]  # merges happen several times
    vocab = TableVocab.count(iter(chunks), 3)
    whole = np.concatenate(chunks)
    for k in range(3):
        assert (vocab.vocabularies[k] == np.unique(whole[:, k])).all()
    capped = TableVocab.count(iter(chunks), 3, max_table_rows=4000)
    assert capped.sizes == [4000] * 3 and capped.vocabularies == [None] * 3


def test_dataset_options_reach_the_loader(tmp_path):
    _, lines = good_lines(30, seed=10)
    path = write_lines(tmp_path / "t.tsv", lines)
    assert load_dataset(f"criteo:{path}").table_sizes == load_criteo(path).table_sizes
    assert load_dataset(f"criteo:{path}", table_sizes="kaggle").table_sizes == KAGGLE_TABLE_SIZES
    assert max(load_dataset(f"criteo:{path}", max_table_rows=8).table_sizes) <= 8
    with pytest.raises(ValueError, match="table_sizes: expected 'auto', 'kaggle'"):
        load_criteo(path, table_sizes="big")
