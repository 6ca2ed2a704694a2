"""run_search end to end on a real local Ray: the digits preset shortened, Optuna inside cells, ASHA."""

import itertools
import json

import pandas as pd
import pytest

from ranksearch.orchestrator import run_search
from ranksearch.orchestrator.pareto import pareto_mask
from ranksearch.search_spaces import load_spec


def shortened_digits_quick() -> dict:
    """The demo preset with its grid intact (every method, both formats) but tiny trials."""
    spec = load_spec("digits-quick").to_dict()
    spec["dataset_options"] = {"max_train": 300}
    spec["train"] |= {"epochs": 1, "finetune_epochs": 0, "max_rank": 4}
    spec["budgets"] = [0.02, 0.05]  # at max rank 4 these select different ranks
    return spec


def brute_front_ids(rows) -> set:
    """Non-dominated (accuracy max, params min) trial ids, by the textbook definition."""
    def dominates(a, b):
        return (a["accuracy"] >= b["accuracy"] and a["params"] <= b["params"]
                and (a["accuracy"] > b["accuracy"] or a["params"] < b["params"]))

    return {b["trial_id"] for b in rows if not any(dominates(a, b) for a in rows)}


@pytest.fixture(scope="module")
def digits_search(ray_session, tmp_path_factory):
    return run_search(shortened_digits_quick(), storage_path=tmp_path_factory.mktemp("runs"), name="digits")


def test_every_cell_appears_and_finishes(digits_search):
    spec = shortened_digits_quick()
    trials = digits_search.trials
    compressing = [m for m in spec["methods"] if m != "dense"]
    expected = {(m, f, b) for m, f, b in itertools.product(compressing, spec["formats"], spec["budgets"])}
    expected.add(("dense", None, None))
    seen = {tuple(None if pd.isna(v) else v for v in key) for key in zip(trials.method, trials.format, trials.budget)}
    assert seen == expected
    assert (trials.status == "ok").all(), trials[trials.status != "ok"][["trial_id", "error"]]
    assert trials.trial_id.is_unique and len(trials) == len(digits_search.records)
    # Sampled hyperparameters land in their method's rows only.
    assert trials[trials.method == "l0"].hp_lam.between(0.01, 1.0).all()
    assert trials[trials.method == "bayesian"].hp_kl_weight.between(1e-5, 1e-3).all()


def test_pareto_is_the_non_dominated_set(digits_search):
    trials, pareto = digits_search.trials, digits_search.pareto
    ok = trials[trials.status == "ok"].to_dict("records")
    groups = {"overall": ok}
    for r in ok:
        groups.setdefault(f"{r['model']}/{r['method']}", []).append(r)
    assert set(pareto.group) == set(groups)
    for group, rows in groups.items():
        assert set(pareto[pareto.group == group].trial_id) == brute_front_ids(rows), group
    # And the shared numpy definition agrees on the overall front.
    values = [[r["accuracy"], r["params"]] for r in ok]
    front = {r["trial_id"] for r, keep in zip(ok, pareto_mask(values, ["max", "min"])) if keep}
    assert front == set(pareto[pareto.group == "overall"].trial_id)


def test_records_are_the_durable_source(digits_search):
    records_dir = digits_search.report_dir.parent / "records"
    files = sorted(p.stem for p in records_dir.glob("*.json"))
    assert files == sorted(digits_search.trials.trial_id)
    record = json.loads((records_dir / f"{files[0]}.json").read_text())
    assert {"trial_id", "status", "config", "layers", "node_ip", "node_id", "tune_trial_id"} <= set(record)
    assert json.loads((digits_search.report_dir.parent / "spec.json").read_text())["name"] == "digits-quick"


def test_optuna_searches_inside_every_cell(ray_session, tmp_path, tiny_spec):
    spec = tiny_spec(
        methods={"l0": {"lam": {"loguniform": [0.01, 1.0]}}, "fixed": {}}, budgets=[0.02, 0.05],
        search={"searcher": "optuna", "samples_per_cell": 2},
    )
    result = run_search(spec, storage_path=tmp_path, name="optuna")
    trials = result.trials
    l0 = trials[trials.method == "l0"]
    assert sorted(l0.budget.tolist()) == [0.02, 0.02, 0.05, 0.05]  # two samples in each l0 cell
    assert l0.hp_lam.between(0.01, 1.0).all() and l0.hp_lam.nunique() == 4
    assert len(trials[trials.method == "fixed"]) == 2  # nothing to sample: one trial per cell
    assert (trials.status == "ok").all()


def test_spec_shapes_reach_every_trial_and_a_wrong_layer_fails_its_trial_by_name(ray_session, tmp_path, tiny_spec):
    shapes = {"1": {"in_shape": [8, 8], "out_shape": [16, 32]}, "3": {"in_shape": [16, 32], "out_shape": [2, 5]}}
    result = run_search(tiny_spec(formats=["ttm"], methods={"fixed": {}, "l0": {}}, shapes={"mlp": shapes}),
                        storage_path=tmp_path, name="shapes")
    assert [r["status"] for r in result.records] == ["ok", "ok"]
    for record in result.records:
        assert {layer["layer"]: layer["tensor_shape"] for layer in record["layers"]} == {
            "1": [16, 32, 8, 8], "3": [2, 5, 16, 32]}
    wrong = run_search(tiny_spec(formats=["ttm"], shapes={"mlp": {"2": {"in_shape": [512]}}}),
                       storage_path=tmp_path, name="wrong-layer")
    assert [r["status"] for r in wrong.records] == ["failed"]
    assert "shapes.2: not a layer this run factorizes; those are: 1, 3" in wrong.records[0]["error"]


def test_asha_stops_trials_early(ray_session, tmp_path, tiny_spec):
    spec = tiny_spec(
        train={"epochs": 3, "finetune_epochs": 0, "max_rank": 4, "lr": {"loguniform": [1e-5, 1e-1]}},
        search={"samples_per_cell": 8, "scheduler": "asha"},
    )
    trials = run_search(spec, storage_path=tmp_path, name="asha").trials
    assert len(trials) == 8
    assert set(trials.status) == {"ok", "stopped"}
    stopped = trials[trials.status == "stopped"]
    assert stopped.accuracy.notna().all() and (stopped.epochs_done < 3).all()  # the metric at the stop is kept


def test_multi_worker_trials_shard_over_ray_train_workers(ray_session, tmp_path):
    """resources.workers: 2 -> each trial drives fit_distributed on two workers (TorchRec on gloo),
    and still fits the 2-CPU Ray: the trial's own token CPU comes out of its workers' share."""
    spec = load_spec("synthetic-dlrm").to_dict()
    spec |= {"methods": {"fixed": {}}, "dataset_options": {"max_train": 2048}, "resources": {"cpu": 1, "workers": 2}}
    (record,) = run_search(spec, storage_path=tmp_path, name="workers").records
    assert record["status"] == "ok", record.get("error")
    assert record["distributed"]["world_size"] == 2 and record["distributed"]["backend"] == "gloo"
    assert 0 < record["auc"] <= 1 and len(record["history"]) == spec["train"]["epochs"]
