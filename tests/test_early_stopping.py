"""Early stopping compares like with like: per cell, at the budget; a cell is never emptied;
stopped trials keep what they measured; Optuna learns from them; resume keeps them stopped."""

import json
from types import SimpleNamespace

from ranksearch.orchestrator import run_search
from ranksearch.orchestrator.early_stop import CellASHA
from ranksearch.orchestrator.plan import build_plan
from ranksearch.orchestrator.searcher import CellSearch
from ranksearch.search_spaces import load_spec

STOP, CONTINUE = "STOP", "CONTINUE"


def two_cell_plan(tiny_spec, tmp_path):
    spec = tiny_spec(methods={"l0": {}, "fixed": {}}, train={"epochs": 4, "finetune_epochs": 0, "max_rank": 4,
                                                            "lr": {"loguniform": [1e-3, 1e-2]}},
                     search={"samples_per_cell": 4, "scheduler": "asha"})
    return build_plan(load_spec(spec), str(tmp_path))


def feed(scheduler, plan, slot_index, rows):
    trial = SimpleNamespace(config={"slot": slot_index})
    return [scheduler.on_trial_result(None, trial, row) for row in rows]


def rows(values, search_epochs=0):
    """Per-epoch rows: `search_epochs` search-phase rows first (values ignored there), then train rows."""
    out = [{"epoch": e + 1, "phase": "search" if e < search_epochs else "train", "val_accuracy": v, "params": 10}
           for e, v in enumerate(values)]
    return out


def test_trials_are_compared_within_their_cell_only_and_at_budget(tiny_spec, tmp_path):
    plan = two_cell_plan(tiny_spec, tmp_path)
    l0 = [s.index for s in plan.slots if s.cell["method"] == "l0"]
    fixed = [s.index for s in plan.slots if s.cell["method"] == "fixed"]
    asha = CellASHA(plan, "val_accuracy", "max")
    assert feed(asha, plan, fixed[0], rows([0.9, 0.9, 0.9, 0.9])) == [CONTINUE] * 4
    # a weak l0 trial is not compared with the strong fixed one: the first of its cell at every rung
    assert feed(asha, plan, l0[0], rows([0.1, 0.1, 0.2, 0.3], search_epochs=2)) == [CONTINUE] * 4
    # search-phase rows never decide anything, however bad; at the budget the cell's rule holds
    assert feed(asha, plan, l0[1], rows([0.0, 0.0, 0.05], search_epochs=2)) == [CONTINUE, CONTINUE, STOP]
    assert asha.stopped == {plan.slots[l0[1]].key}
    assert [r["epoch"] for r in asha.history[plan.slots[l0[1]].key]] == [1, 2, 3]  # kept for its record
    # a fixed trial worse than the first fixed one at rung 1 stops; its cell keeps the leader
    assert feed(asha, plan, fixed[1], rows([0.5]))[0] == STOP
    # the last epoch is never a stop
    asha2 = CellASHA(plan, "val_accuracy", "max")
    feed(asha2, plan, fixed[0], rows([0.9, 0.9, 0.9, 0.9]))
    assert feed(asha2, plan, fixed[2], rows([0.95, 0.1, 0.1, 0.1])) == [CONTINUE] * 4  # rung 4 = its last epoch


def test_resume_seeds_the_rungs_from_records(tiny_spec, tmp_path):
    plan = two_cell_plan(tiny_spec, tmp_path)
    fixed = [s for s in plan.slots if s.cell["method"] == "fixed"]
    record = {"trial_id": fixed[0].key, "status": "ok", "history": rows([0.9, 0.9, 0.9, 0.9])}
    asha = CellASHA(plan, "val_accuracy", "max", done=[record])
    assert feed(asha, plan, fixed[1].index, rows([0.5]))[0] == STOP  # compared with the trial before the resume


def test_optuna_studies_are_rebuilt_from_records(tiny_spec, tmp_path):
    plan = two_cell_plan(tiny_spec, tmp_path)
    l0 = [s for s in plan.slots if s.cell["method"] == "l0"]
    done = [
        {"trial_id": l0[0].key, "status": "ok", "accuracy": 0.8, "params": 100, "config": {"lr": 0.005}},
        {"trial_id": l0[1].key, "status": "stopped", "config": {"lr": 0.002}, "history": rows([0.1, 0.3], 1)},
        {"trial_id": l0[2].key, "status": "failed", "config": {"lr": 0.5}},  # outside the space: left out
    ]
    todo = (l0[3].index,)
    search = CellSearch(plan, ["accuracy", "params"], ["max", "min"], todo=todo, done=done, epoch_metric="val_accuracy")
    config = search.suggest("t1")
    assert config["slot"] == l0[3].index and 1e-3 <= config["train"]["lr"] <= 1e-2
    study = search._studies[l0[3].cell_index]._ot_study
    trials = study.get_trials(deepcopy=False)
    states = sorted(t.state.name for t in trials)
    assert states == ["COMPLETE", "PRUNED", "RUNNING"]
    pruned = next(t for t in trials if t.state.name == "PRUNED")
    assert pruned.intermediate_values == {1: 0.3} and pruned.params == {"train/lr": 0.002}
    assert search.suggest("t2") is not None and search.suggest("t2") == "FINISHED"


def test_asha_with_optuna_keeps_every_method_and_what_stopped_trials_measured(ray_session, tmp_path, tiny_spec,
                                                                             monkeypatch):
    spec = tiny_spec(
        formats=["ttm"], budgets=[0.1], dataset_options={"max_train": 400},
        methods={"l0": {"lam": {"loguniform": [0.1, 3.0]}}, "bayesian": {"kl_weight": {"loguniform": [1e-5, 1e-3]}},
                 "fixed": {}},
        train={"epochs": 4, "finetune_epochs": 1, "max_rank": 4, "lr": {"loguniform": [1e-3, 1e-2]}},
        search={"searcher": "optuna", "scheduler": "asha", "samples_per_cell": 3},
    )
    log = tmp_path / "started.log"
    monkeypatch.setenv("RANKSEARCH_TRIAL_LOG", str(log))
    result = run_search(spec, storage_path=tmp_path, name="asha-optuna")
    trials = result.trials
    assert len(trials) == 9 and (trials.groupby("method").size() == 3).all()  # samples count, whatever stops
    assert set(trials[trials.status == "ok"].method) == {"l0", "bayesian", "fixed"}
    groups = set(result.pareto.group)
    assert {"mlp/l0", "mlp/bayesian", "mlp/fixed"} <= groups, groups
    records = {r["trial_id"]: r for r in result.records}
    stopped = [r for r in records.values() if r["status"] == "stopped"]
    for r in stopped:
        assert r["history"] and r["accuracy"] == r["history"][-1]["val_accuracy"] and r["epochs_done"] >= 1
        # stopped only by a trial of its own cell that did better at the same rung, at the budget
        assert r["history"][-1]["phase"] in ("train", "finetune")
        n = sum(row["phase"] in ("train", "finetune") for row in r["history"])
        rivals = [o for o in records.values() if o["trial_id"] != r["trial_id"] and o["method"] == r["method"]]
        at_rung = [[row for row in o["history"] if row["phase"] in ("train", "finetune")] for o in rivals]
        assert any(len(h) >= n and h[n - 1]["val_accuracy"] > r["accuracy"] for h in at_rung)
    assert (trials[trials.status == "stopped"].accuracy.notna()).all()

    # resume: stopped trials stay stopped and nothing runs again
    before = log.read_text()
    statuses = {k: r["status"] for k, r in records.items()}
    again = run_search(json.loads((tmp_path / "asha-optuna" / "spec.json").read_text()), storage_path=tmp_path,
                       name="asha-optuna", resume=True)
    assert {r["trial_id"]: r["status"] for r in again.records} == statuses
    assert log.read_text() == before
