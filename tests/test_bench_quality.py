"""bench/quality.py's report: cells averaged over seeds, reached / budget, LWIQ's rank-search ratios."""

from bench.quality import _markdown, _rows


def _record(method, seed, accuracy, search_s, reached=None):
    return {"model": "lenet5", "method": method, "label": method, "format": "tt" if method != "dense" else None,
            "budget": 0.045 if method != "dense" else None, "seed": seed, "accuracy": accuracy, "params": 2000,
            "compression": 22.0, "tensorized_params": 1000, "tensorized_dense_params": 22000, "budget_met": True,
            "ranks": {}, "rank_search_time_s": search_s, "wall_time_s": 100.0,
            "method_state": {} if reached is None else {"reached_over_budget": reached}}


def test_cells_average_seeds_and_lwiqs_rank_search_is_compared_with_the_others():
    records = [_record("dense", s, 0.995, 0.0) for s in (0, 1)]
    records += [_record("lwiq", 0, 0.990, 10.0), _record("lwiq", 1, 0.992, 14.0),
                _record("l0", 0, 0.991, 60.0, 0.98), _record("l0", 1, 0.993, 64.0, 1.0),
                _record("bayesian", 0, 0.989, 40.0, 0.9), _record("bayesian", 1, 0.989, 44.0, 0.96)]
    rows = {r["method"]: r for r in _rows(records)}
    assert rows["l0"]["accuracy"] == 0.992 and rows["l0"]["delta_vs_dense"] == -0.003
    assert rows["l0"]["reached_over_budget"] == 0.99 and rows["lwiq"]["reached_over_budget"] == "-"
    text = _markdown(list(rows.values()), "mnist:/data")
    assert "- rank search, lenet5 tt 0.045: lwiq 12.0 s; l0 62.0 s = 5.2×, bayesian 42.0 s = 3.5×" in text
