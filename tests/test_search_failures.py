"""Failing trials are results, not crashes: recorded with their error while the search goes on."""

from types import SimpleNamespace

from ranksearch.orchestrator import run_search, search
from ranksearch.orchestrator.plan import build_plan
from ranksearch.orchestrator.records import ExperimentFiles
from ranksearch.search_spaces import load_spec


def test_failing_and_diverging_trials_are_recorded_and_the_rest_finish(ray_session, tmp_path, tiny_spec):
    spec = tiny_spec(
        budgets=[0.01, 0.05],  # 0.01 is below what rank 1 on every edge needs: fit raises BudgetError
        train={"epochs": 1, "finetune_epochs": 0, "max_rank": 4, "lr": {"choice": [0.01, 1.0e9]}},  # 1e9: NaN loss
        search={"samples_per_cell": 3},
    )
    result = run_search(spec, storage_path=tmp_path, name="failures")
    trials = result.trials
    assert len(trials) == 6

    too_small = trials[trials.budget == 0.01]
    assert (too_small.status == "failed").all()
    assert too_small.error.str.contains("BudgetError: budget: 384 parameters is below the minimum").all()

    fits = trials[trials.budget == 0.05]
    diverged, sane = fits[fits.hp_lr == 1.0e9], fits[fits.hp_lr == 0.01]
    assert len(diverged) and len(sane), "the seeded sampler should draw both learning rates"
    assert (diverged.status == "failed").all()
    assert diverged.error.str.startswith("FloatingPointError: training diverged: loss is nan").all()
    assert (sane.status == "ok").all() and sane.error.isna().all() and sane.accuracy.notna().all()

    assert set(result.pareto.trial_id) <= set(sane.trial_id)  # fronts are over finished trials only


def test_tune_errors_and_early_stops_get_records(tmp_path, tiny_spec):
    """Trials that never reach their own record: the worker died (after Tune's retries), or the
    scheduler stopped them. The driver writes their records from Tune's results."""
    plan = build_plan(load_spec(tiny_spec(search={"seeds": [0, 1, 2, 3]})), str(tmp_path))
    files = ExperimentFiles(str(tmp_path))
    finished = plan.base_record(plan.slots[0], {}) | {"status": "ok", "error": None, "accuracy": 0.5}
    files.write_record(finished)
    oom = ("ray.exceptions.RayActorError: The actor died unexpectedly before finishing this task.\n"
           "ray.exceptions.OutOfMemoryError: Task was killed due to the node running low on memory.\n")
    grid = [
        SimpleNamespace(config={"slot": 0}, metrics={"done_record": True}, error=None),
        SimpleNamespace(config={"slot": 1}, metrics={"trial_id": "t1"}, error=RuntimeError(oom)),
        SimpleNamespace(config={"slot": 2}, metrics={"trial_id": "t2", "epoch": 1, "params": 99}, error=None),
        SimpleNamespace(config={"slot": 3}, metrics={}, error=None),  # never started (time budget)
    ]
    rows = [{"epoch": 1, "phase": "train", "val_accuracy": 0.25, "params": 99}]
    records = {r["trial_id"]: r for r in search.collect_records(plan, grid, files, {plan.slots[2].key: rows},
                                                                  {plan.slots[2].key})}
    assert records[plan.slots[0].key] == finished
    died = records[plan.slots[1].key]
    assert died["status"] == "failed" and died["tune_trial_id"] == "t1"
    assert died["error"] == "ray.exceptions.OutOfMemoryError: Task was killed due to the node running low on memory."
    stopped = records[plan.slots[2].key]
    assert (stopped["status"], stopped["epochs_done"], stopped["params"]) == ("stopped", 1, 99)
    assert stopped["accuracy"] == 0.25 and stopped["history"] == rows  # what it measured is kept
    assert plan.slots[3].key not in records
