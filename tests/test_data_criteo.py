"""Criteo TSV reading and the synthetic generator, on small files in the raw format written into tmp_path."""

import gzip
import logging
import math
import re

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from threadpoolctl import threadpool_limits
from torchrec.datasets.criteo import DEFAULT_CAT_NAMES
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from ranksearch.models.data import DatasetError, RecData, load_dataset
from ranksearch.models.data import criteo
from ranksearch.models.data.criteo import KAGGLE_TABLE_SIZES, NUM_DENSE, NUM_SPARSE, iter_criteo_batches, load_criteo
from ranksearch.models.data.synthetic import SYNTHETIC_TABLE_SIZES, synthetic_criteo

SMALL_SIZES = [7, 1000, 3, 10**7, 5, 1, 97, 2**31, 11, 13] + [1 + 17 * k for k in range(16)]


def random_fields(rng):
    """Fields of one valid line: empty values, negative counts, mixed-case and odd-length hex included."""
    label = str(rng.integers(0, 2))
    digits = rng.integers(1, 10, NUM_DENSE)
    dense = ["" if rng.random() < 0.2 else str(int(rng.integers(-3, 10 ** int(d)))) for d in digits]
    cats = []
    for _ in range(NUM_SPARSE):
        u = rng.random()
        if u < 0.1:
            cats.append("")
        elif u < 0.2:
            cats.append(format(int(rng.integers(0, 2**62)), "x").upper())  # up to 16 digits
        elif u < 0.3:
            cats.append(format(int(rng.integers(0, 4096)), "x"))  # short
        else:
            cats.append(format(int(rng.integers(0, 2**32)), "08x"))  # the usual 8 digits
    return [label] + dense + cats


def reference(fields, sizes):
    """The spec, written plainly: log(1 + max(x, 0)), int(hex, 16) % size, empty -> 0."""
    dense = [math.log1p(max(int(x) if x else 0, 0)) for x in fields[1 : 1 + NUM_DENSE]]
    sparse = [int(h, 16) % s if h else 0 for h, s in zip(fields[1 + NUM_DENSE :], sizes)]
    return float(fields[0]), dense, sparse


def write_lines(path, lines, newline="\n"):
    path.write_bytes("".join(line + newline for line in lines).encode())
    return path


def good_lines(n, seed=0):
    rng = np.random.default_rng(seed)
    fields = [random_fields(rng) for _ in range(n)]
    return fields, ["\t".join(f) for f in fields]


def assert_matches_reference(data, fields, sizes):
    expected = [reference(f, sizes) for f in fields]
    assert data.labels.tolist() == [e[0] for e in expected]
    np.testing.assert_allclose(data.dense.numpy(), np.array([e[1] for e in expected]), rtol=1e-6)
    assert data.sparse.tolist() == [e[2] for e in expected]


# --- reading ---------------------------------------------------------------------------------------


def test_values_match_the_plain_reference(tmp_path):
    fields, lines = good_lines(500)
    data = load_criteo(write_lines(tmp_path / "train.txt", lines), table_sizes=SMALL_SIZES, test_fraction=0)
    assert data.dense.dtype == torch.float32 and data.sparse.dtype == torch.int64 and data.labels.dtype == torch.float32
    assert data.dense.shape == (500, NUM_DENSE) and data.sparse.shape == (500, NUM_SPARSE)
    assert_matches_reference(data, fields, SMALL_SIZES)
    assert data.skipped == {}


def test_hashing_and_log_transform_by_hand(tmp_path):
    dense = ["0", "-2", "", "9", "1234567890123", "9" * 19] + ["7"] * 7
    line = "\t".join(["1", *dense, "ffffffff", "", "A", "0000000f"] + ["1"] * 22)
    sizes = [1000, 5, 7, 16] + [3] * 22
    data = load_criteo(write_lines(tmp_path / "one.tsv", [line]), table_sizes=sizes, test_fraction=0)
    expected = [0.0, 0.0, 0.0, math.log(10), math.log1p(1234567890123), math.log1p(10**19)]
    assert data.dense[0, :6].tolist() == pytest.approx(expected)
    assert data.sparse[0, :4].tolist() == [4294967295 % 1000, 0, 10 % 7, 15]
    assert data.labels.tolist() == [1.0]


def test_malformed_lines_are_counted_by_reason_and_skipped(tmp_path, caplog):
    fields, lines = good_lines(6, seed=1)
    base = lines[0].split("\t")

    def variant(index, value):
        f = list(base)
        f[index] = value
        return "\t".join(f)

    bad = [
        "\t".join(base[:-1]),  # 39 fields
        lines[0] + "\textra",  # 41 fields
        variant(0, "2"),  # label not 0/1
        variant(0, ""),
        variant(3, "1.5"),  # dense not an integer
        variant(5, "abc"),
        variant(13, "-"),
        variant(7, "1" * 20),  # more digits than 64 bits hold
        variant(20, "xyz1"),  # id not hex
        variant(39, "1" * 17),  # id wider than 64 bits
        variant(17, "ab\u00e9c"),  # non-ASCII bytes
        variant(0, "1.0"),
    ]
    mixed = [lines[0], bad[0], lines[1], bad[1], bad[2], lines[2], "", *bad[3:9], lines[3], *bad[9:]]
    mixed += [lines[4], lines[5]]
    path = write_lines(tmp_path / "mixed.tsv", mixed, newline="\r\n")
    with caplog.at_level(logging.WARNING, logger="ranksearch.models.data.criteo"):
        data = load_criteo(path, table_sizes=SMALL_SIZES, test_fraction=0)
    assert data.skipped == {"field_count": 2, "bad_label": 3, "bad_dense": 4, "bad_sparse": 3}
    assert_matches_reference(data, fields, SMALL_SIZES)  # the good lines survive, in order, CRLF stripped
    summary = [r.getMessage() for r in caplog.records]
    assert len(summary) == 1
    assert "skipped 12 malformed lines" in summary[0] and "bad_sparse=3" in summary[0]


def plain_reason(line):
    """The documented rules, one line at a time with regular expressions."""
    if line == "":
        return "blank"  # ignored: neither a row nor an error
    fields = line.split("\t")
    if len(fields) != 1 + NUM_DENSE + NUM_SPARSE:
        return "field_count"
    if fields[0] not in ("0", "1"):
        return "bad_label"
    if not all(re.fullmatch(r"(-?\d{1,19})?", f) for f in fields[1 : 1 + NUM_DENSE]):
        return "bad_dense"
    if not all(re.fullmatch(r"[0-9a-fA-F]{0,16}", f) for f in fields[1 + NUM_DENSE :]):
        return "bad_sparse"
    return None


def test_random_corruptions_match_the_plain_rules(tmp_path):
    rng = np.random.default_rng(11)
    junk = ["", "x", "-", "-0", "1.5", " 7", "+3", "12a", "g", "0x1f", "\u00e9", "1" * 19, "1" * 20, "f" * 16, "f" * 17,
            "2", "00000000", "a\tb"]
    fields, lines = good_lines(400, seed=10)
    for i in range(len(lines)):
        f = lines[i].split("\t")
        for _ in range(rng.integers(0, 3)):
            f[rng.integers(0, len(f))] = junk[rng.integers(0, len(junk))]
        if rng.random() < 0.05:
            f = f[: rng.integers(0, len(f))]
        lines[i] = "\t".join(f)
    reasons = [plain_reason(line) for line in lines]
    data = load_criteo(write_lines(tmp_path / "fuzz.tsv", lines), table_sizes=SMALL_SIZES, test_fraction=0)
    expected_skipped = {r: reasons.count(r) for r in set(reasons) - {None, "blank"}}
    assert data.skipped == expected_skipped and len(expected_skipped) == 4
    kept = [line.split("\t") for line, r in zip(lines, reasons) if r is None]
    assert len(kept) > 100
    assert_matches_reference(data, kept, SMALL_SIZES)


@pytest.mark.parametrize(
    "line_no, index, value, message",
    [
        (3, 20, "xyz1", r":3: bad_sparse: cat_6 = 'xyz1', expected a hex id"),
        (2, 4, "4.2", r":2: bad_dense: int_3 = '4.2', expected an integer"),
        (4, 0, "yes", r":4: bad_label: label = 'yes', expected 0 or 1"),
        (5, None, None, r":5: field_count: 39 tab-separated fields, expected 40"),
    ],
)
def test_strict_mode_names_file_line_and_problem(tmp_path, line_no, index, value, message):
    _, lines = good_lines(6)
    f = lines[line_no - 1].split("\t")
    if index is None:
        f = f[:-1]
    else:
        f[index] = value
    lines[line_no - 1] = "\t".join(f)
    path = write_lines(tmp_path / "day_0", lines)
    with pytest.raises(DatasetError, match=str(path) + message):
        load_criteo(path, strict=True)
    with pytest.raises(DatasetError, match=message):
        list(iter_criteo_batches(tmp_path, None, 2, strict=True))
    assert len(load_criteo(path).labels) == 5


def test_strict_line_numbers_count_across_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(criteo, "CHUNK_BYTES", 1000)  # about 4 lines a chunk
    _, lines = good_lines(50, seed=2)
    lines.insert(36, "")  # blank lines count for numbering but are not errors
    lines[41] = lines[41].replace("\t", " ", 1)
    with pytest.raises(DatasetError, match=r":42: field_count: 39 tab-separated fields"):
        load_criteo(write_lines(tmp_path / "t.tsv", lines), strict=True)


def test_garbage_files_fail_clearly(tmp_path):
    (tmp_path / "bin").write_bytes(bytes(range(11, 256)) * 9000)  # 2 MB without a newline
    with pytest.raises(DatasetError, match="no line break in its first .* not a Criteo TSV"):
        load_criteo(tmp_path / "bin")
    (tmp_path / "text.txt").write_text("hello world\nsecond line\n")
    with pytest.raises(DatasetError, match=r"no valid lines in .*text.txt \(skipped: \{'field_count': 2\}\)"):
        load_criteo(tmp_path / "text.txt")
    (tmp_path / "day_0.gz").write_bytes(b"\x1f\x8b\x08 broken")
    with pytest.raises(DatasetError, match="cannot read .*day_0.gz"):
        load_criteo(tmp_path / "day_0.gz")


def test_paths_files_and_directory_layouts(tmp_path):
    fields, lines = good_lines(30, seed=3)
    kaggle = tmp_path / "kaggle"
    kaggle.mkdir()
    write_lines(kaggle / "train.txt", lines)
    write_lines(kaggle / "test.txt", ["not read"])
    assert_matches_reference(load_criteo(kaggle, table_sizes=SMALL_SIZES, test_fraction=0), fields, SMALL_SIZES)

    terabyte = tmp_path / "terabyte"
    terabyte.mkdir()
    for day, part in ((10, lines[20:]), (2, lines[10:20])):
        (terabyte / f"day_{day}.gz").write_bytes(gzip.compress("".join(l + "\n" for l in part).encode()))
    write_lines(terabyte / "day_0", lines[:10])
    assert_matches_reference(load_criteo(terabyte, table_sizes=SMALL_SIZES, test_fraction=0), fields, SMALL_SIZES)

    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="neither train.txt nor day_N files"):
        load_criteo(tmp_path / "empty")
    with pytest.raises(DatasetError, match="missing.tsv not found; expected a raw TSV file"):
        load_criteo(tmp_path / "missing.tsv")
    with pytest.raises(ValueError, match="table_sizes: expected .auto., .kaggle. or 26 positive sizes"):
        load_criteo(kaggle, table_sizes=[10] * 25)


def test_split_and_max_rows(tmp_path):
    _, lines = good_lines(40, seed=4)
    path = write_lines(tmp_path / "t.tsv", lines)
    data = load_criteo(path, max_rows=30, table_sizes="kaggle")
    assert len(data.labels) == 30 and data.num_test == 3  # the last 10 %
    assert data.split_range("train") == range(27) and data.split_range("test") == range(27, 30)
    assert data.table_sizes == KAGGLE_TABLE_SIZES and data.feature_names == list(DEFAULT_CAT_NAMES)
    assert int(data.sparse.max()) < max(KAGGLE_TABLE_SIZES)
    via_spec = load_dataset(f"criteo:{path}", max_train=10, max_test=2, seed=5, table_sizes="kaggle")
    full = load_dataset(f"criteo:{path}", table_sizes="kaggle")  # hashed: distinct values in column 0
    assert isinstance(via_spec, RecData) and len(via_spec.labels) == 12 and via_spec.num_test == 2
    rows = [full.sparse[:, 0].tolist().index(v) for v in via_spec.sparse[:, 0].tolist()]
    assert rows == sorted(rows) and max(rows[:10]) < 36 <= min(rows[10:])  # subsets of each split, order kept
    assert torch.equal(via_spec.sparse, full.sparse[rows])
    again = load_dataset(f"criteo:{path}", max_train=10, max_test=2, seed=5, table_sizes="kaggle")
    assert torch.equal(again.sparse, via_spec.sparse)


# --- batches ---------------------------------------------------------------------------------------


def check_batch(batch, dense, sparse, labels):
    kjt = batch.sparse
    assert isinstance(kjt, KeyedJaggedTensor)
    assert kjt.keys() == list(DEFAULT_CAT_NAMES) and kjt.stride() == len(labels)
    assert kjt.lengths().tolist() == [1] * (NUM_SPARSE * len(labels))
    for k, key in enumerate(kjt.keys()):
        assert kjt[key].values().tolist() == sparse[:, k].tolist()
    assert torch.equal(batch.dense, dense) and torch.equal(batch.labels, labels)


def test_recdata_batches_build_keyed_jagged_tensors(tmp_path):
    _, lines = good_lines(25, seed=6)
    data = load_criteo(write_lines(tmp_path / "t.tsv", lines), table_sizes=SMALL_SIZES, test_fraction=0.2)
    batches = list(data.batches(8))
    assert [len(b.labels) for b in batches] == [8, 8, 4]
    check_batch(batches[2], data.dense[16:20], data.sparse[16:20], data.labels[16:20])
    test = list(data.batches(8, split="test"))
    check_batch(test[0], data.dense[20:], data.sparse[20:], data.labels[20:])
    shuffled = [b.labels for b in data.batches(8, shuffle=True, seed=1)]
    again = [b.labels for b in data.batches(8, shuffle=True, seed=1)]
    assert all(torch.equal(a, b) for a, b in zip(shuffled, again))
    order = torch.cat([b.dense[:, 0] for b in data.batches(8, shuffle=True, seed=1)])
    assert sorted(order.tolist()) == sorted(data.dense[:20, 0].tolist()) and not torch.equal(order, data.dense[:20, 0])
    with pytest.raises(ValueError, match="split: expected 'train' or 'test'"):
        next(data.batches(8, split="val"))


def test_streaming_spans_chunks_and_matches_loading(tmp_path, monkeypatch):
    fields, lines = good_lines(400, seed=7)
    lines[123] = "\t".join(lines[123].split("\t")[:20])  # one malformed line mid-file
    path = write_lines(tmp_path / "t.tsv", lines)
    loaded = load_criteo(path, table_sizes=SMALL_SIZES, test_fraction=0)
    monkeypatch.setattr(criteo, "CHUNK_BYTES", 777)  # lines straddle chunk borders everywhere
    skipped = {}
    batches = list(iter_criteo_batches(path, SMALL_SIZES, 64, skipped=skipped))
    assert [len(b.labels) for b in batches] == [64] * 6 + [15]
    assert skipped == {"field_count": 1}
    for i, batch in enumerate(batches):
        rows = slice(64 * i, 64 * i + len(batch.labels))
        check_batch(batch, loaded.dense[rows], loaded.sparse[rows], loaded.labels[rows])
    assert [len(b.labels) for b in iter_criteo_batches(path, SMALL_SIZES, 100, max_rows=250)] == [100, 100, 50]


def test_streaming_a_file_larger_than_the_default_chunk(tmp_path):
    _, lines = good_lines(300, seed=8)
    text = "".join(line + "\n" for line in lines) * 120  # 36,000 lines
    assert len(text) > 2 * criteo.CHUNK_BYTES
    (tmp_path / "day_0.gz").write_bytes(gzip.compress(text.encode(), compresslevel=1))
    sizes, total = [], None
    for batch in iter_criteo_batches(tmp_path, SMALL_SIZES, 4096):
        sizes.append(len(batch.labels))
        ids = batch.sparse["cat_3"].values()
        total = ids if total is None else torch.cat([total, ids])
    assert sizes == [4096] * 8 + [36000 - 8 * 4096]
    assert torch.equal(total.reshape(120, 300), total[:300].expand(120, 300))  # every repetition read alike


# --- synthetic -------------------------------------------------------------------------------------


def test_synthetic_is_deterministic_by_seed_and_prefix_stable():
    a = synthetic_criteo(2000, seed=1)
    b = load_dataset("synthetic-criteo", num_samples=2000, seed=1)
    c = synthetic_criteo(2000, seed=2)
    longer = synthetic_criteo(3000, seed=1)
    assert torch.equal(a.sparse, b.sparse) and torch.equal(a.labels, b.labels) and torch.equal(a.dense, b.dense)
    assert not torch.equal(a.sparse, c.sparse)
    assert torch.equal(longer.sparse[:2000], a.sparse) and torch.equal(longer.labels[:2000], a.labels)
    assert a.name == "synthetic-criteo" and a.num_test == 200 and a.table_sizes == SYNTHETIC_TABLE_SIZES
    assert a.info["signal_tables"] == [0, 1, 2, 3] and a.info["rank"] == 4


def test_synthetic_shapes_ranges_and_label_balance():
    data = synthetic_criteo(5000, seed=0)
    assert data.dense.shape == (5000, NUM_DENSE) and data.dense.dtype == torch.float32
    assert bool((data.dense >= 0).all()) and bool(torch.isfinite(data.dense).all())
    assert data.sparse.dtype == torch.int64 and int(data.sparse.min()) >= 0
    assert bool((data.sparse < torch.tensor(data.table_sizes)).all())
    assert 0.15 < float(data.labels.mean()) < 0.6
    batch = next(data.batches(16))
    check_batch(batch, data.dense[:16], data.sparse[:16], data.labels[:16])


def test_synthetic_ids_are_zipf_skewed():
    data = synthetic_criteo(20000, seed=0)
    counts = np.sort(np.bincount(data.sparse[:, 0].numpy(), minlength=100_000))[::-1]
    assert counts[:10].sum() / 20000 > 0.3  # a uniform draw would give 10 of 100,000 ids 0.01 %
    assert counts[0] > 50 * counts[100]
    assert (counts > 0).sum() > 1000  # a long tail, not a handful of ids


def test_synthetic_kaggle_sized_tables_cost_nothing():
    data = synthetic_criteo(2000, KAGGLE_TABLE_SIZES, seed=0)
    assert data.info["signal_tables"] == [2, 11, 15, 20]  # the four largest, 5*10^6..10^7 rows
    assert bool((data.sparse < torch.tensor(KAGGLE_TABLE_SIZES)).all())
    assert int(data.sparse[:, 2].max()) > 10**6  # scattered over the whole 10^7-row table


def one_hot(sparse, tables, top=50):
    """One column per frequent id (top per table, fitted on all rows) plus an 'other' column per table."""
    columns = []
    for t in tables:
        ids = sparse[:, t]
        frequent = np.argsort(np.bincount(ids))[::-1][:top]
        columns.append((ids[:, None] == frequent[None, :]).astype(np.float32))
        columns.append((~np.isin(ids, frequent))[:, None].astype(np.float32))
    return np.concatenate(columns, axis=1)


def auc_of(data, tables):
    x = one_hot(data.sparse.numpy(), tables)
    y = data.labels.numpy()
    train, test = data.split_range("train"), data.split_range("test")
    with threadpool_limits(1):  # a small fit: threads only contend on a busy 2-core machine
        model = LogisticRegression(max_iter=500).fit(x[train.start : train.stop], y[train.start : train.stop])
    return roc_auc_score(y[test.start :], model.predict_proba(x[test.start :])[:, 1])


def test_synthetic_signal_is_planted_where_documented():
    data = synthetic_criteo(20000, seed=0, test_fraction=0.25)
    signal = auc_of(data, data.info["signal_tables"])
    noise = auc_of(data, [10, 11, 12, 13])
    assert signal > 0.6, signal
    assert abs(noise - 0.5) < 0.04, noise
    assert data.info["oracle_test_auc"] > signal + 0.1  # interactions and dense features hold the rest


def test_synthetic_rejects_bad_arguments():
    with pytest.raises(ValueError, match="table_sizes"):
        synthetic_criteo(10, [5] * 3)
    with pytest.raises(ValueError, match="signal_tables"):
        synthetic_criteo(10, signal_tables=[30, 1])
    with pytest.raises(ValueError, match="rank"):
        synthetic_criteo(10, rank=0)
