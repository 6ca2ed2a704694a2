"""Table sizes from the data: one streaming pass counts each feature's distinct ids.

A 120k-line Criteo file sized at the Kaggle cardinalities gets 33 M-row tables for a few
thousand ids each; `table_sizes: auto` instead gives each feature a table of the ids it saw
(plus one row for ids first seen at test time), as the DLRM reference's preprocessing does.
`max_table_rows` caps a table: a feature with more distinct ids than the cap is hashed
(raw id % cap, the reference's `--max-ind-range`), and its id set is dropped as soon as it
passes the cap, so memory stays bounded by the cap per feature.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

RAW_MODULUS = np.uint64(1 << 63)  # parse_chunk's modulus for raw ids: every 8-hex-digit Criteo id fits unchanged


class _DistinctSet:
    """Sorted distinct values, merged in amortized-doubling batches (O(n log n) over the stream)."""

    def __init__(self):
        self.merged = np.zeros(0, np.int64)
        self.pending: list[np.ndarray] = []
        self.pending_size = 0

    def add(self, values: np.ndarray) -> None:
        part = np.unique(values)
        self.pending.append(part)
        self.pending_size += len(part)
        if self.pending_size > max(len(self.merged), 1 << 16):
            self.flush()

    def flush(self) -> np.ndarray:
        if self.pending:
            self.merged = np.unique(np.concatenate([self.merged, *self.pending]))
            self.pending, self.pending_size = [], 0
        return self.merged

    def __len__(self) -> int:
        return len(self.flush())


class TableVocab:
    """Per feature: a vocabulary (sorted distinct raw ids -> rows 0..n-1, unseen -> row n) or a hash cap."""

    def __init__(self, vocabularies: list[np.ndarray | None], hashed: list[int | None]):
        self.vocabularies, self.hashed = vocabularies, hashed

    @classmethod
    def count(cls, chunks: Iterable[np.ndarray], num_features: int, max_table_rows: int | None = None) -> "TableVocab":
        """From raw id arrays (rows, num_features), in one pass."""
        if max_table_rows is not None and (isinstance(max_table_rows, bool) or not isinstance(max_table_rows, int)
                                           or max_table_rows < 1):
            raise ValueError(f"max_table_rows: expected a positive integer, got {max_table_rows!r}")
        sets = [_DistinctSet() for _ in range(num_features)]
        over = [False] * num_features
        for chunk in chunks:
            for k in range(num_features):
                if over[k]:
                    continue
                sets[k].add(chunk[:, k])
                if max_table_rows is not None and sets[k].pending_size + len(sets[k].merged) > max_table_rows \
                        and len(sets[k]) + 1 > max_table_rows:
                    over[k], sets[k] = True, None  # hashed from here on: its ids need not be kept
        vocabularies = [None if over[k] else sets[k].flush() for k in range(num_features)]
        return cls(vocabularies, [max_table_rows if over[k] else None for k in range(num_features)])

    @property
    def sizes(self) -> list[int]:
        return [h if v is None else len(v) + 1 for v, h in zip(self.vocabularies, self.hashed)]

    def rows(self, raw: np.ndarray) -> np.ndarray:
        """Table rows (int64, same shape) of raw ids (rows, num_features)."""
        out = np.empty(raw.shape, np.int64)
        for k, (vocab, cap) in enumerate(zip(self.vocabularies, self.hashed)):
            column = raw[:, k]
            if vocab is None:
                out[:, k] = column % cap
                continue
            idx = np.searchsorted(vocab, column)
            seen = idx < len(vocab)
            seen[seen] = vocab[idx[seen]] == column[seen]
            out[:, k] = np.where(seen, idx, len(vocab))
        return out
