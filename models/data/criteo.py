"""Criteo click logs for a TorchRec DLRM: raw TSV reading (streaming or materialized) and batches.

Raw lines are `label \\t 13 integers \\t 26 hex ids` (Kaggle `train.txt`, Terabyte `day_N`), any
field may be empty. As in the DLRM reference, dense features become log(1 + max(x, 0)). Tables
are sized from the data by default (`table_sizes="auto"`: the distinct ids of the training part,
see criteo_vocab.py, `max_table_rows` hashing beyond a cap); `"kaggle"` or a list of 26 sizes
hash ids into fixed tables with int(hex, 16) % table_size (an empty id is 0). torchrec's own
Criteo readers expect preprocessed .npy files, so only its column names are used here.
"""

from __future__ import annotations

import gzip
import logging
import re
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torchrec.datasets.criteo import DEFAULT_CAT_NAMES, DEFAULT_INT_NAMES
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from .common import DatasetError, subsample_indices
from .criteo_tsv import NUM_DENSE, NUM_SPARSE, REASONS, parse_chunk
from .criteo_vocab import RAW_MODULUS, TableVocab

__all__ = [
    "NUM_DENSE", "NUM_SPARSE", "KAGGLE_TABLE_SIZES", "FEATURE_NAMES", "DENSE_NAMES", "REASONS",
    "RecBatch", "RecData", "TableVocab", "criteo_vocab", "iter_criteo_batches", "load_criteo", "criteo_files",
]

# Cardinalities of the 26 categorical features of the Criteo Kaggle (Display Advertising) data set.
KAGGLE_TABLE_SIZES = [
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
]
FEATURE_NAMES = list(DEFAULT_CAT_NAMES)  # cat_0 .. cat_25: the KeyedJaggedTensor keys
DENSE_NAMES = list(DEFAULT_INT_NAMES)  # int_0 .. int_12
CHUNK_BYTES = 4 << 20  # bytes parsed at once: a few tens of thousands of lines, tens of MB of temporaries
CHUNK_ROWS = 1 << 16  # rows counted at once when sizing tables from materialized data
MAX_LINE_BYTES = 1 << 20  # a "line" longer than this means the file is not a Criteo TSV

log = logging.getLogger(__name__)


@dataclass
class RecBatch:
    """One DLRM batch: dense (B, 13) float32, sparse KeyedJaggedTensor (one id per key and sample), labels (B,)."""

    dense: torch.Tensor
    sparse: KeyedJaggedTensor
    labels: torch.Tensor

    def to(self, device, non_blocking: bool = False) -> RecBatch:
        return RecBatch(
            self.dense.to(device, non_blocking=non_blocking),
            self.sparse.to(device, non_blocking=non_blocking),
            self.labels.to(device, non_blocking=non_blocking),
        )


@lru_cache(maxsize=8)
def _unit_lengths(batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lengths (all 1) and offsets of a batch, shared by every batch of that size (as torchrec's reader does)."""
    num_ids = batch_size * NUM_SPARSE
    return torch.ones(num_ids, dtype=torch.int32), torch.arange(num_ids + 1, dtype=torch.int32)


def make_batch(dense: torch.Tensor, sparse: torch.Tensor, labels: torch.Tensor) -> RecBatch:
    """Wrap (B, 26) ids as a KeyedJaggedTensor: values key by key, every length 1.

    All lengths and offsets are known, so they are passed in instead of being computed and synced
    per batch, as torchrec's own in-memory Criteo reader does.
    """
    batch_size = len(labels)
    lengths, offsets = _unit_lengths(batch_size)
    kjt = KeyedJaggedTensor(
        keys=FEATURE_NAMES,
        values=sparse.t().reshape(-1),
        lengths=lengths,
        offsets=offsets,
        stride=batch_size,
        length_per_key=[batch_size] * NUM_SPARSE,
        offset_per_key=list(range(0, batch_size * NUM_SPARSE + 1, batch_size)),
    )
    return RecBatch(dense, kjt, labels)


@dataclass
class RecData:
    """Criteo-like samples in memory. The last `num_test` rows are the test split (time order, as
    Criteo's own evaluation holds out the last day; none by default); the rest are train."""

    name: str
    dense: torch.Tensor  # float32 (N, 13), already log-transformed
    sparse: torch.Tensor  # int64 (N, 26), already hashed into [0, table_sizes[k])
    labels: torch.Tensor  # float32 (N,)
    table_sizes: list[int]
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> malformed lines skipped
    num_test: int = 0
    info: dict = field(default_factory=dict)  # how the data was made (generator settings, source path)

    feature_names = FEATURE_NAMES

    def split_range(self, split: str) -> range:
        """Row indices of `split` ("train" or "test")."""
        cut = len(self.labels) - self.num_test
        if split == "train":
            return range(cut)
        if split == "test":
            return range(cut, len(self.labels))
        raise ValueError(f"split: expected 'train' or 'test', got {split!r}")

    def batches(
        self, batch_size: int, *, split: str = "train", shuffle: bool = False, seed: int = 0
    ) -> Iterator[RecBatch]:
        """Batches of `split` in row order (or shuffled by `seed`); the last one may be smaller."""
        if batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        span = self.split_range(split)
        rows = torch.arange(span.start, span.stop)
        if shuffle:
            rows = rows[torch.from_numpy(np.random.default_rng(seed).permutation(len(rows)))]
        for start in range(0, len(rows), batch_size):
            idx = rows[start : start + batch_size]
            yield make_batch(self.dense[idx], self.sparse[idx], self.labels[idx])

    def subsample(self, max_train: int | None, max_test: int | None, seed: int) -> RecData:
        """At most `max_train` / `max_test` rows of each split, chosen by `seed`, order kept."""
        if max_train is None and max_test is None:
            return self
        train = self.split_range("train")
        test = self.split_range("test")
        keep_train = train.start + subsample_indices(len(train), max_train, seed)
        keep_test = test.start + subsample_indices(len(test), max_test, seed + 1)
        rows = torch.from_numpy(np.concatenate([keep_train, keep_test]))
        return RecData(
            self.name, self.dense[rows], self.sparse[rows], self.labels[rows], list(self.table_sizes),
            skipped=dict(self.skipped), num_test=len(keep_test), info=dict(self.info),
        )


# --- reading raw TSV -------------------------------------------------------------------------------


def criteo_files(path) -> list[Path]:
    """The TSV files behind `path`: the file itself, or a directory's train.txt, or its day_N[.gz] in day order."""
    path = Path(path).expanduser()
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DatasetError(
            f"criteo: {path} not found; expected a raw TSV file or a directory with train.txt or day_N files"
        )
    for name in ("train.txt", "train.txt.gz"):
        if (path / name).is_file():
            return [path / name]
    days = [p for p in path.iterdir() if p.is_file() and re.fullmatch(r"day_\d+(\.gz)?", p.name)]
    if not days:
        raise DatasetError(f"criteo: {path} holds neither train.txt nor day_N files (Kaggle or Terabyte layout)")
    return sorted(days, key=lambda p: int(re.search(r"\d+", p.name).group()))


def _check_table_sizes(table_sizes, max_table_rows: int | None = None) -> list[int]:
    """Fixed sizes: "kaggle" (also None) or a list of 26, each capped at max_table_rows."""
    if isinstance(table_sizes, str) and table_sizes != "kaggle":
        raise ValueError(f"table_sizes: expected 'auto', 'kaggle' or {NUM_SPARSE} positive sizes, got {table_sizes!r}")
    sizes = list(KAGGLE_TABLE_SIZES if table_sizes in (None, "kaggle") else table_sizes)
    if len(sizes) != NUM_SPARSE or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or int(s) < 1
                                       for s in sizes):
        raise ValueError(f"table_sizes: expected 'auto', 'kaggle' or {NUM_SPARSE} positive sizes, got {table_sizes!r}")
    if max_table_rows is not None:
        if isinstance(max_table_rows, bool) or not isinstance(max_table_rows, int) or max_table_rows < 1:
            raise ValueError(f"max_table_rows: expected a positive integer, got {max_table_rows!r}")
        sizes = [min(int(s), max_table_rows) for s in sizes]
    return [int(s) for s in sizes]


def _read_chunks(path: Path) -> Iterator[bytes]:
    """Whole lines, about CHUNK_BYTES at a time, each chunk ending with a newline; gzip read transparently."""
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            rest = b""
            while block := f.read(CHUNK_BYTES):
                data = rest + block
                cut = data.rfind(b"\n") + 1
                if cut == 0 and len(data) > MAX_LINE_BYTES:
                    raise DatasetError(
                        f"criteo: {path} has no line break in its first {len(data)} bytes; not a Criteo TSV"
                    )
                if cut:
                    yield data[:cut]
                rest = data[cut:]
            if rest:
                yield rest + b"\n"
    except (OSError, EOFError, zlib.error) as exc:
        raise DatasetError(f"criteo: cannot read {path}: {exc}") from exc


def _iter_parsed(path, table_sizes, *, strict: bool, max_rows: int | None, skipped: Counter):
    """(dense, sparse, labels) numpy arrays chunk by chunk over all files, counting skipped lines by reason.
    `table_sizes` None: sparse holds the raw ids (for a TableVocab)."""
    sizes = np.full(NUM_SPARSE, RAW_MODULUS, np.uint64) if table_sizes is None else np.asarray(table_sizes, np.uint64)
    remaining = max_rows
    try:
        for file in criteo_files(path):
            line_offset = 0
            for data in _read_chunks(file):
                chunk = parse_chunk(data, sizes)
                if strict and chunk.first_bad:
                    raise DatasetError(f"criteo: {file}:{line_offset + chunk.bad_lines[0] + 1}: {chunk.first_bad}")
                line_offset += chunk.num_lines
                skipped.update(REASONS[r] for r in chunk.bad_reasons)
                rows = len(chunk.labels) if remaining is None else min(remaining, len(chunk.labels))
                if rows:
                    yield chunk.dense[:rows], chunk.sparse[:rows], chunk.labels[:rows]
                if remaining is not None:
                    remaining -= rows
                    if remaining == 0:
                        return
    finally:
        if skipped:
            summary = ", ".join(f"{reason}={count}" for reason, count in sorted(skipped.items()))
            log.warning("criteo: skipped %d malformed lines in %s (%s)", sum(skipped.values()), path, summary)


def criteo_vocab(path, *, max_rows: int | None = None, max_table_rows: int | None = None) -> TableVocab:
    """Distinct ids per feature over (the first `max_rows` lines of) `path`, in one streaming pass."""
    chunks = (sparse for _, sparse, _ in _iter_parsed(path, None, strict=False, max_rows=max_rows, skipped=Counter()))
    return TableVocab.count(chunks, NUM_SPARSE, max_table_rows)


def iter_criteo_batches(
    path, table_sizes: Sequence[int] | str | TableVocab | None, batch_size: int, *,
    strict: bool = False, max_rows: int | None = None, skipped: dict | None = None,
    max_table_rows: int | None = None,
) -> Iterator[RecBatch]:
    """Stream RecBatches from raw TSV without holding the file in memory; the last batch may be smaller.

    `table_sizes`: a list or "kaggle" (ids hashed into fixed tables), or a `TableVocab` (from
    `criteo_vocab`, whose `.sizes` the model needs). Malformed lines are skipped and counted by
    reason into `skipped` (if given; a summary is logged at the end), or with `strict` raise a
    DatasetError naming file, line number and problem.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    vocab = table_sizes if isinstance(table_sizes, TableVocab) else None
    sizes = None if vocab is not None else _check_table_sizes(table_sizes, max_table_rows)
    counts = Counter()
    pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    num_pending = 0
    try:
        for part in _iter_parsed(path, sizes, strict=strict, max_rows=max_rows, skipped=counts):
            if vocab is not None:
                part = (part[0], vocab.rows(part[1]), part[2])
            pending.append(part)
            num_pending += len(part[2])
            if num_pending < batch_size:
                continue
            dense, sparse, labels = (np.concatenate(arrays) for arrays in zip(*pending))
            full = num_pending - num_pending % batch_size
            for start in range(0, full, batch_size):
                stop = start + batch_size
                yield make_batch(*(torch.from_numpy(a[start:stop]) for a in (dense, sparse, labels)))
            pending = [(dense[full:], sparse[full:], labels[full:])]
            num_pending -= full
        if num_pending:
            yield make_batch(*(torch.from_numpy(np.concatenate(arrays)) for arrays in zip(*pending)))
    finally:
        if skipped is not None:
            skipped.update(counts)


def load_criteo(
    path, *, table_sizes: Sequence[int] | str = "auto", max_table_rows: int | None = None,
    max_rows: int | None = None, strict: bool = False, test_fraction: float = 0.1,
) -> RecData:
    """Materialize up to `max_rows` rows as RecData (all when None: the full Kaggle set is ~12 GB in
    memory, twice that while the chunks are joined).

    The last round(test_fraction * N) rows are the test split. `table_sizes="auto"` sizes each table
    to the distinct ids of the training rows (+1 row for ids unseen there), hashing a feature with
    more than `max_table_rows` of them; "kaggle" or a list of 26 sizes hash into fixed tables
    (capped at `max_table_rows`).
    """
    if not 0 <= test_fraction < 1:
        raise ValueError(f"test_fraction: expected a value in [0, 1), got {test_fraction}")
    auto = isinstance(table_sizes, str) and table_sizes == "auto"
    sizes = None if auto else _check_table_sizes(table_sizes, max_table_rows)
    skipped = Counter()
    parts = list(_iter_parsed(path, sizes, strict=strict, max_rows=max_rows, skipped=skipped))
    if not parts:
        raise DatasetError(f"criteo: no valid lines in {path} (skipped: {dict(skipped) or 'none'})")
    dense, sparse, labels = (np.concatenate(arrays) for arrays in zip(*parts))
    num_test = round(test_fraction * len(labels))
    info = {"path": str(path), "table_sizes": "auto" if auto else "fixed", "max_table_rows": max_table_rows}
    if auto:
        train = len(labels) - num_test
        vocab = TableVocab.count((sparse[i : min(i + CHUNK_ROWS, train)] for i in range(0, train, CHUNK_ROWS)), NUM_SPARSE,
                                 max_table_rows)
        sparse, sizes = vocab.rows(sparse), vocab.sizes
        info["hashed_features"] = [FEATURE_NAMES[k] for k, h in enumerate(vocab.hashed) if h is not None]
    return RecData(
        name="criteo",
        dense=torch.from_numpy(dense),
        sparse=torch.from_numpy(sparse),
        labels=torch.from_numpy(labels),
        table_sizes=sizes,
        num_test=num_test,
        skipped=dict(skipped),
        info=info,
    )
