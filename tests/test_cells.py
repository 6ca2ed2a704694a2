"""cells.parquet: mean ± std per (model, dataset, format, method, budget) over seeds, paired test vs the best
cell, fronts over cell means, the printed table and pareto.png's error bars."""

import math

import pyarrow.parquet as pq
import pytest
from scipy import stats

from ranksearch.orchestrator.cells import SINGLE_SEED_NOTE, cells_text, paired_p_value
from ranksearch.orchestrator.report import write_reports


def record(i, method, seed, accuracy, params, budget=0.1, fmt="tt", sample=0, status="ok"):
    return {"trial_id": f"t{i}", "model": "mlp", "dataset": "digits", "format": fmt, "method": method,
            "budget": budget, "seed": seed, "sample": sample, "status": status, "error": None, "config": {},
            "accuracy": accuracy, "params": params, "dense_params": 10_000, "compression": 10_000 / params if params else None,
            "tensorized_params": params, "tensorized_dense_params": 9_000, "budget_met": True}


def records():
    """At budget 0.1 over three seeds: l0 beats fixed by 2-3 points on every seed (a real difference),
    bayesian differs from l0 by +-0.5 (noise). lwiq at 0.2 has one seed. A failed trial is ignored."""
    acc = {"l0": [0.92, 0.93, 0.91], "fixed": [0.90, 0.90, 0.885], "bayesian": [0.925, 0.925, 0.90]}
    params = {"l0": 900, "fixed": 880, "bayesian": 950}
    out, i = [], 0
    for method, values in acc.items():
        for seed, a in enumerate(values):
            out.append(record(i, method, seed, a, params[method] + seed))
            i += 1
    out.append(record(i, "lwiq", 0, 0.95, 1_800, budget=0.2))
    out.append(record(i + 1, "fixed", 1, None, None, status="failed"))
    return out


@pytest.fixture
def cells(tmp_path):
    paths = write_reports(records(), tmp_path)
    assert paths.cells == tmp_path / "cells.parquet"
    return {(r["method"], r["budget"]): r for r in pq.read_table(paths.cells).to_pylist()}


def test_one_row_per_cell_with_mean_std_and_seed_count(cells):
    assert set(cells) == {("l0", 0.1), ("fixed", 0.1), ("bayesian", 0.1), ("lwiq", 0.2)}
    l0 = cells[("l0", 0.1)]
    assert l0["seeds"] == 3 and l0["seed_list"] == [0, 1, 2]
    assert l0["accuracy_mean"] == pytest.approx(0.92)
    assert l0["accuracy_std"] == pytest.approx(0.01)
    assert l0["params_mean"] == pytest.approx(901)
    assert cells[("fixed", 0.1)]["seeds"] == 3  # the failed trial is not a seed
    assert cells[("lwiq", 0.2)]["seeds"] == 1 and cells[("lwiq", 0.2)]["accuracy_std"] is None


def test_paired_test_separates_a_real_difference_from_seed_noise(cells):
    l0, fixed, bayesian = cells[("l0", 0.1)], cells[("fixed", 0.1)], cells[("bayesian", 0.1)]
    assert l0["is_best"] and l0["p_value"] is None  # the best of its model and budget
    assert fixed["delta_accuracy_vs_best"] == pytest.approx(0.895 - 0.92)
    assert fixed["p_value"] == pytest.approx(stats.ttest_rel([0.92, 0.93, 0.91], [0.90, 0.90, 0.885]).pvalue)
    assert fixed["significant"] is True
    assert bayesian["significant"] is False and bayesian["paired_seeds"] == 3
    lwiq = cells[("lwiq", 0.2)]
    assert lwiq["is_best"]  # alone at its budget


def test_fronts_are_over_cell_means(cells):
    # means: fixed 0.895 @ 881, l0 0.92 @ 901, bayesian 0.9167 @ 951 (dominated by l0), lwiq 0.95 @ 1800
    assert {k for k, c in cells.items() if c["on_front"]} == {("fixed", 0.1), ("l0", 0.1), ("lwiq", 0.2)}


def test_best_sample_per_seed_represents_the_cell(tmp_path):
    rs = [record(0, "l0", 0, 0.80, 900), record(1, "l0", 0, 0.90, 905, sample=1),
          record(2, "l0", 1, 0.88, 900), record(3, "l0", 1, 0.70, 910, sample=1)]
    row = pq.read_table(write_reports(rs, tmp_path).cells).to_pylist()[0]
    assert row["trials"] == 4 and row["seeds"] == 2
    assert row["accuracy_mean"] == pytest.approx(0.89) and row["params_mean"] == pytest.approx(902.5)


def test_printed_table_says_which_differences_beat_the_noise(tmp_path):
    write_reports(records(), tmp_path)
    text = cells_text(tmp_path)
    lines = {line.split()[1]: line for line in text.splitlines()[2:]}
    assert "best" in lines["l0"] and "0.9200 ± 0.0100" in lines["l0"]
    assert "worse (p=" in lines["fixed"]
    assert "within noise" in lines["bayesian"]
    assert SINGLE_SEED_NOTE not in text


def test_a_single_seed_search_says_so(tmp_path):
    write_reports([record(0, "l0", 0, 0.9, 900), record(1, "fixed", 0, 0.8, 900)], tmp_path)
    text = cells_text(tmp_path)
    assert SINGLE_SEED_NOTE in text and "untested" in text


def test_paired_p_value_edge_cases():
    assert paired_p_value([0.9], [0.8]) is None
    assert paired_p_value([0.9, 0.8], [0.8, 0.7]) == 0.0  # the same difference on every seed
    assert paired_p_value([0.9, 0.8], [0.9, 0.8]) == 1.0
    p = paired_p_value([0.9, 0.8, 0.85], [0.88, 0.81, 0.80])
    assert 0 < p < 1 and math.isclose(p, stats.ttest_rel([0.9, 0.8, 0.85], [0.88, 0.81, 0.80]).pvalue)


def test_pareto_png_draws_error_bars_for_multi_seed_cells():
    from matplotlib.container import ErrorbarContainer

    from ranksearch.orchestrator import report
    from ranksearch.orchestrator.cells import cells_table

    trials = report._trials_table(records())
    objectives = report._resolve_objectives(None, trials)
    cells = cells_table(trials, objectives).to_pylist()
    figure = report._plot(trials, report._pareto_table(trials, objectives), objectives, cells)
    bars = [c for c in figure.axes[0].containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == 3  # l0, fixed, bayesian: lwiq has one seed, nothing to draw
    means = sorted(float(bar.lines[0].get_ydata()[0]) for bar in bars)
    assert means == pytest.approx(sorted(c["accuracy_mean"] for c in cells if c["seeds"] > 1))
    assert all(bar.has_xerr and bar.has_yerr for bar in bars)


def test_a_record_without_compression_prints_a_dash(tmp_path):
    """A valid record may lack `compression` (a model without tensorizable layers): the table still prints."""
    bare = record(0, "dense", 0, 0.9, 900)
    bare["compression"] = None
    write_reports([bare, record(1, "l0", 0, 0.8, 900)], tmp_path)
    line = next(l for l in cells_text(tmp_path).splitlines() if l.startswith("mlp") and "dense" in l)
    assert "0.9000" in line and " - " in line
