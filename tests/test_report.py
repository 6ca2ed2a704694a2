"""Reports: fronts and hypervolume against independent computations, file contract, atomic writes."""

import itertools
import json
import math
import os

import duckdb
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from ranksearch.orchestrator import report
from ranksearch.orchestrator.pareto import hypervolume, pareto_mask
from ranksearch.orchestrator.report import LAYER_SCHEMA, TRIAL_SCHEMA, front_table, load_reports, write_reports

FILES = ("trials.parquet", "layers.parquet", "pareto.parquet", "pareto.png", "index.html", "cells.parquet")


def brute_front(values, modes):
    """Textbook O(n²) definition, written without numpy broadcasting."""
    sign = [1 if m == "min" else -1 for m in modes]
    rows = [[s * x for s, x in zip(sign, row)] for row in values]
    keep = []
    for i, a in enumerate(rows):
        if any(math.isnan(x) for x in a):
            keep.append(False)
            continue
        dominated = any(
            all(y <= x for x, y in zip(a, b)) and any(y < x for x, y in zip(a, b))
            for j, b in enumerate(rows)
            if j != i and not any(math.isnan(y) for y in b)
        )
        keep.append(not dominated)
    return np.array(keep, dtype=bool)


@pytest.mark.parametrize("seed", range(60))
def test_pareto_mask_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n, k = int(rng.integers(0, 40)), int(rng.integers(1, 4))
    values = rng.integers(0, 6, size=(n, k)).astype(float)  # small integer grid: many ties and duplicates
    if n and seed % 3 == 0:
        values[rng.integers(0, n, size=max(1, n // 5)), rng.integers(0, k)] = np.nan
    modes = [["min", "max"][b] for b in rng.integers(0, 2, size=k)]
    np.testing.assert_array_equal(pareto_mask(values, modes), brute_front(values.tolist(), modes))


def test_pareto_mask_keeps_exact_ties():
    values = np.array([[0.9, 100], [0.9, 100], [0.8, 100], [0.95, 200]])
    assert pareto_mask(values, ["max", "min"]).tolist() == [True, True, False, True]


def test_hypervolume_hand_computed():
    assert hypervolume([[0.5, 0.5]], [1.0, 1.0]) == pytest.approx(0.25)
    # Two points: 0.8 * 0.6 + 0.2 * ... ; as a union of boxes [x,1]×[y,1]: (0.2,0.6) and (0.6,0.2)
    assert hypervolume([[0.2, 0.6], [0.6, 0.2]], [1.0, 1.0]) == pytest.approx(0.8 * 0.4 + 0.4 * 0.4)
    # A dominated point, a duplicate and a point beyond the reference change nothing.
    more = [[0.2, 0.6], [0.6, 0.2], [0.7, 0.7], [0.6, 0.2], [1.5, 0.1]]
    assert hypervolume(more, [1.0, 1.0]) == pytest.approx(0.48)
    # accuracy ↑ against reference 0, size fraction ↓ against reference 1.
    assert hypervolume([[0.9, 0.1]], [0.0, 1.0], ["max", "min"]) == pytest.approx(0.9 * 0.9)
    assert hypervolume([[0.5, 0.5, 0.5]], [1, 1, 1]) == pytest.approx(0.125)
    assert hypervolume(np.empty((0, 2)), [1.0, 1.0]) == 0.0


def test_hypervolume_3d_against_grid_count():
    rng = np.random.default_rng(0)
    pts = rng.random((6, 3))
    grid = (np.arange(40) + 0.5) / 40
    cells = np.stack(np.meshgrid(grid, grid, grid, indexing="ij"), -1).reshape(-1, 3)
    covered = np.any(np.all(pts[None, :, :] <= cells[:, None, :], axis=2), axis=1)
    assert hypervolume(pts, [1, 1, 1]) == pytest.approx(covered.mean(), abs=0.02)


def layer(name, ranks, params, dense):
    return {
        "layer": name, "kind": "linear", "format": "tt", "shape": [64, 32], "tensor_shape": [[4, 4, 4], [2, 4, 4]],
        "max_ranks": [8, 8], "ranks": ranks, "params": params, "dense_params": dense,
    }  # fmt: skip


def synthetic_records(n=40, seed=0):
    rng = np.random.default_rng(seed)
    records = []
    cells = list(itertools.product(["mlp", "lenet5"], ["bayesian", "l0", "lwiq"], ["tt", "cp"]))
    for i in range(n):
        model, method, fmt = cells[i % len(cells)]
        dense = 60_000 if model == "mlp" else 40_000
        params = int(rng.integers(1_000, dense))
        status = "ok" if i % 7 not in (3, 5) else ("failed" if i % 7 == 3 else "stopped")
        acc = float(np.round(rng.uniform(0.5, 1.0), 2))  # rounded: ties happen
        rec = {
            "trial_id": f"t{i:03d}", "model": model, "dataset": "digits", "format": fmt, "method": method,
            "budget": [0.1, 0.3, 0.5][i % 3], "seed": i % 2, "status": status, "error": None,
            "config": {"lr": float(rng.choice([1e-3, 3e-3])), "epochs": 5},
            "accuracy": acc, "params": params, "dense_params": dense, "compression": dense / params,
            "tensorized_params": params - 500, "tensorized_dense_params": dense - 500, "budget_met": bool(i % 2),
            "wall_time_s": 1.5, "rank_search_time_s": 0.2, "epochs_done": 5,
            "layers": [layer("fc1", [3, 4], params - 900, dense - 900), layer("fc2", [2, 2], 400, 400)],
        }  # fmt: skip
        if status == "failed":
            rec.update(error=f"RuntimeError: trial {i} diverged", accuracy=None, params=None, layers=[])
        if method == "bayesian":
            rec["config"]["prior"] = "half_cauchy"
        if status == "stopped":
            rec["epochs_done"] = 2
        records.append(rec)
    records[0]["accuracy"] = float("nan")  # an ok trial whose metric is NaN: excluded from fronts
    records[1].update(budget=None, budget_params=5_000)  # an absolute budget
    records[2]["config"].update(max_rank=16, shape=[[4, 7], [4, 4]])
    records[4]["config"].update(max_rank="auto")
    records.append(
        {"trial_id": "dense-mlp", "model": "mlp", "dataset": "digits", "format": None, "method": "dense",
         "budget": None, "seed": 0, "status": "ok", "error": None, "config": {"lr": 1e-3, "epochs": 5},
         "accuracy": 0.97,
         "params": 60_000, "dense_params": 60_000, "compression": 1.0, "budget_met": True, "wall_time_s": 1.0,
         "rank_search_time_s": 0.0, "epochs_done": 5}
    )  # fmt: skip
    return records


def expected_fronts(records, metric="accuracy"):
    """Group → set of trial_ids, computed from the records with the brute-force front."""
    ok = [r for r in records if r["status"] == "ok" and r.get(metric) is not None and not math.isnan(r[metric])]
    groups = {"overall": ok}
    for r in ok:
        groups.setdefault(f"{r['model']}/{r['method']}", []).append(r)
    fronts = {}
    for name, members in groups.items():
        mask = brute_front([[r[metric], r["params"]] for r in members], ["max", "min"])
        fronts[name] = {r["trial_id"] for r, keep in zip(members, mask) if keep}
    return fronts


def test_write_reports_contract(tmp_path):
    records = synthetic_records()
    paths = write_reports(records, tmp_path)
    for name in FILES:
        assert (tmp_path / name).stat().st_size > 0
    assert paths.pareto == tmp_path / "pareto.parquet"
    assert not list(tmp_path.glob(".*.tmp"))
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "trials.parquet").stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600

    frames = load_reports(tmp_path)
    trials, layers, pareto = frames["trials"], frames["layers"], frames["pareto"]
    assert trials["trial_id"].tolist() == [r["trial_id"] for r in records]
    assert list(trials.columns[: len(TRIAL_SCHEMA)]) == TRIAL_SCHEMA.names
    assert {"hp_lr", "hp_epochs", "hp_prior"} <= set(trials.columns)
    assert set(layers["trial_id"]) <= set(trials["trial_id"]) and set(pareto["trial_id"]) <= set(trials["trial_id"])
    failed = trials[trials["status"] == "failed"]
    assert len(failed) and failed["error"].str.contains("diverged").all()
    assert (trials["status"] == "stopped").any()
    assert json.loads(trials.set_index("trial_id").loc["t001", "ranks_json"]) == {"fc1": [3, 4], "fc2": [2, 2]}
    assert pd.isna(trials.set_index("trial_id").loc["dense-mlp", "format"])

    # Fronts: ok trials only, each group exactly the independent front.
    ok_ids = set(trials.loc[trials["status"] == "ok", "trial_id"])
    assert set(pareto["trial_id"]) <= ok_ids and "t000" not in set(pareto["trial_id"])
    got = {g: set(df["trial_id"]) for g, df in pareto.groupby("group")}
    assert got == expected_fronts(records)
    assert "mlp/dense" in got and "lenet5/l0" in got

    # One hypervolume per group, against the stated reference, recomputed here.
    meta = pareto.attrs["ranksearch"]
    assert meta["hypervolume"]["reference_point"] == [0.0, 1.0]
    for g, df in pareto.groupby("group"):
        assert df["hypervolume"].nunique() == 1
        pts = np.column_stack([df["accuracy"], df["params"] / df["dense_params"]])
        assert df["hypervolume"].iloc[0] == pytest.approx(hypervolume(pts, [0.0, 1.0], ["max", "min"]))
        assert sorted(df["rank_in_front"]) == list(range(1, len(df) + 1))
        best = df.sort_values("rank_in_front").iloc[0]
        assert best["accuracy"] == df["accuracy"].max()
    assert pq.read_schema(paths.pareto).metadata[b"ranksearch"]


def test_column_types(tmp_path):
    write_reports(synthetic_records(), tmp_path)
    trials = pq.read_table(tmp_path / "trials.parquet")
    assert trials.schema.remove_metadata().field("hp_lr").type == "double"
    assert trials.schema.field("hp_epochs").type == "int64"
    assert trials["hp_max_rank"].to_pylist()[2:5] == ["16", None, "auto"]  # mixed: text, non-strings as JSON
    assert trials["hp_shape"].to_pylist()[2] == "[[4, 7], [4, 4]]"
    assert trials["budget"].to_pylist()[1] is None and trials["budget_params"].to_pylist()[1] == 5_000


def test_layers_table_types(tmp_path):
    write_reports(synthetic_records(), tmp_path)
    schema = pq.read_schema(tmp_path / "layers.parquet")
    assert schema.remove_metadata() == LAYER_SCHEMA
    row = pq.read_table(tmp_path / "layers.parquet").to_pylist()[0]
    assert row["shape"] == [64, 32] and row["tensor_shape"] == [[4, 4, 4], [2, 4, 4]] and row["ranks"] == [3, 4]


def test_readable_by_duckdb_and_pyarrow(tmp_path):
    write_reports(synthetic_records(), tmp_path)
    for name in FILES[:3]:
        path = tmp_path / name
        n_duck = duckdb.sql(f"select count(*) from '{path}'").fetchall()[0][0]
        assert n_duck == pq.read_table(path).num_rows == len(pd.read_parquet(path))
    groups = duckdb.sql(f"select distinct \"group\" from '{tmp_path / 'pareto.parquet'}'").fetchall()
    assert ("overall",) in groups
    layers, trials = tmp_path / "layers.parquet", tmp_path / "trials.parquet"
    joined = duckdb.sql(f"select count(*) from '{layers}' join '{trials}' using (trial_id)").fetchall()[0][0]
    assert joined == pq.read_table(tmp_path / "layers.parquet").num_rows


@pytest.mark.parametrize(
    "records",
    [[], [{"trial_id": "a", "status": "failed", "error": "boom", "model": "mlp", "method": "l0"}]],
    ids=["no-trials", "only-failed"],
)
def test_empty_reports_keep_the_schema(tmp_path, records):
    write_reports(records, tmp_path)
    for name in FILES:
        assert (tmp_path / name).exists()
    trials = pq.read_schema(tmp_path / "trials.parquet")
    assert trials.remove_metadata() == TRIAL_SCHEMA
    assert pq.read_schema(tmp_path / "layers.parquet").remove_metadata() == LAYER_SCHEMA
    pareto = pq.read_table(tmp_path / "pareto.parquet")
    assert pareto.num_rows == 0
    assert pareto.column_names == ["group", "rank_in_front", "hypervolume", *TRIAL_SCHEMA.names]
    assert duckdb.sql(f"select count(*) from '{tmp_path / 'pareto.parquet'}'").fetchall()[0][0] == 0
    assert "no Pareto-optimal trials" in front_table(tmp_path)


def test_auc_is_the_default_when_no_accuracy(tmp_path):
    records = [
        {"trial_id": str(i), "model": "dlrm", "method": "bayesian", "status": "ok", "auc": auc, "logloss": 0.5,
         "params": p, "dense_params": 1000}
        for i, (auc, p) in enumerate([(0.78, 100), (0.80, 200), (0.79, 300)])
    ]  # fmt: skip
    write_reports(records, tmp_path)
    pareto = load_reports(tmp_path)["pareto"]
    assert set(pareto["trial_id"]) == {"0", "1"}
    assert pareto.attrs["ranksearch"]["objectives"][0] == {"metric": "auc", "mode": "max"}
    assert "auc" in front_table(tmp_path).splitlines()[0]


def test_custom_objective_reference(tmp_path):
    records = [
        {"trial_id": str(i), "model": "dlrm", "method": "l0", "status": "ok", "logloss": ll, "params": p,
         "dense_params": 1000}
        for i, (ll, p) in enumerate([(0.40, 500), (0.50, 100), (0.45, 600)])
    ]  # fmt: skip
    objectives = [{"metric": "logloss", "mode": "min"}, {"metric": "params", "mode": "min"}]
    write_reports(records, tmp_path, objectives=objectives)
    pareto = load_reports(tmp_path)["pareto"]
    assert set(pareto["trial_id"]) == {"0", "1"}
    ref = pareto.attrs["ranksearch"]["hypervolume"]["reference_point"]
    assert ref == pytest.approx([0.55, 1.0])  # max observed logloss × 1.1; dense size
    expected = hypervolume([[0.40, 0.5], [0.50, 0.1]], ref)
    assert pareto["hypervolume"].iloc[0] == pytest.approx(expected)
    with pytest.raises(ValueError, match="not a numeric column"):
        write_reports(records, tmp_path, objectives=[{"metric": "nope", "mode": "max"}])


def test_front_table_lists_every_front_row(tmp_path):
    write_reports(synthetic_records(), tmp_path)
    text = front_table(tmp_path)
    lines = text.splitlines()
    assert lines[0].split()[:5] == ["group", "model", "method", "format", "budget"]
    assert len(lines) == 1 + len(pq.read_table(tmp_path / "pareto.parquet")) + 1
    assert lines[-1].startswith("hypervolume reference point")


def test_bad_records_raise_before_writing(tmp_path):
    with pytest.raises(ValueError, match="unique trial_id"):
        write_reports([{"trial_id": "a", "status": "ok"}] * 2, tmp_path)
    with pytest.raises(ValueError, match="status"):
        write_reports([{"trial_id": "a", "status": "done"}], tmp_path)
    assert not list(tmp_path.iterdir())


def test_failed_write_leaves_previous_file_intact(tmp_path, monkeypatch):
    write_reports(synthetic_records(), tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in FILES}
    real_write, calls = report.pq.write_table, []

    def crash_on_second_file(table, where, **kwargs):
        """Write trials.parquet normally, then die half-way through layers.parquet."""
        calls.append(where)
        if len(calls) == 1:
            return real_write(table, where, **kwargs)
        with open(where, "wb") as f:
            f.write(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(report.pq, "write_table", crash_on_second_file)
    with pytest.raises(OSError, match="disk full"):
        write_reports(synthetic_records(n=10, seed=1), tmp_path)
    assert len(calls) == 2 and not os.path.exists(calls[1])
    # Each file is either its new version whole or its previous version; no temporary file is left.
    assert len(pd.read_parquet(tmp_path / "trials.parquet")) == 11
    for name in FILES[1:]:
        assert (tmp_path / name).read_bytes() == before[name]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(FILES)
