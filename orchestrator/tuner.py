"""The Tune experiment of a plan: search algorithm, scheduler, resources."""

from __future__ import annotations

import contextlib
import os
from functools import partial

from ranksearch.search_spaces import Spec

from .plan import DRIVER_CPU, EPOCH_METRICS, Plan

TUNE_ENV = {
    "RAY_CHDIR_TO_TRIAL_DIR": "0",  # relative data paths stay relative to where the search started
    "RAY_AIR_NEW_OUTPUT": "0",  # the legacy reporter honours verbose=0: our progress lines only
    # Trials report per-epoch rows (ASHA's metric) and one final summary (the searcher's
    # objectives): no single result carries every metric, as Tune's strict check demands.
    "TUNE_DISABLE_STRICT_METRIC_CHECKING": "1",
    # Per-trial logs: result.json only (JsonLoggerCallback below); CSV and TensorBoard copies
    # cost a file writer per trial and hold nothing the records and result.json do not.
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
    "TUNE_DISABLE_SIGINT_HANDLER": "1",  # Ctrl-C is ours (interrupt.py): stop, report, say how to resume
}


@contextlib.contextmanager
def tune_environment():
    """TUNE_ENV while a search's Tuner is built and runs, restored after: it is process-wide
    state, and other Tuners in the same process (tests, notebooks) keep Tune's defaults."""
    saved = {key: os.environ.get(key) for key in TUNE_ENV}
    os.environ.update(TUNE_ENV)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def make_tuner(plan: Plan, spec: Spec, storage: str, name: str, todo: tuple[int, ...], done: list[dict], stopper):
    """A new Tuner over the plan's slots `todo` (indices), with `done` the valid records of the others.

    Always a fresh Tuner, also on resume: Tune's own saved state (`tuner.pkl`, searcher and
    experiment snapshots) is never restored, since restoring unpickles files from storage; the
    records say what ran, and the searcher and scheduler are seeded from them (searcher.py,
    early_stop.py). Returns (tuner, scheduler)."""
    from ray import tune
    from ray.tune.logger import JsonLoggerCallback

    from .live_report import LiveReport, slot_rows
    from .metrics import SearchMetrics
    from .progress import SearchProgress
    from .trainable import run_trial

    trainable = tune.with_resources(tune.with_parameters(run_trial, plan=plan), _resources(spec.resources))
    keys = tuple(slot.key for slot in plan.slots)
    search_alg, param_space, num_samples = _search_alg(plan, spec, todo, done)
    scheduler = _scheduler(plan, spec, done)
    tune_config = tune.TuneConfig(
        search_alg=search_alg, scheduler=scheduler, num_samples=num_samples,
        time_budget_s=spec.search["time_budget_s"],
        reuse_actors=True,  # one worker process runs many trials: no per-trial process start, imports, data load
        trial_name_creator=partial(_trial_name, keys), trial_dirname_creator=partial(_trial_dirname, keys),
    )
    methods = tuple(slot.cell["method"] for slot in plan.slots)
    run_config = tune.RunConfig(
        name=name, storage_path=storage, verbose=0, stop=stopper,
        failure_config=tune.FailureConfig(max_failures=spec.search["max_failures"]),
        callbacks=[SearchProgress(name, methods, spec.objectives), SearchMetrics(name, methods, spec.objectives),
                   LiveReport(plan.experiment_path, name, slot_rows(plan), spec.objectives), JsonLoggerCallback()],
    )
    return tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=run_config), scheduler


def _search_alg(plan: Plan, spec: Spec, todo: tuple[int, ...], done: list[dict]):
    """(search_alg, param_space, num_samples): Tune's grid + sampling, or one Optuna study per cell.
    Sampling is seeded with the first training seed: the same spec draws the same values."""
    from ray import tune

    seed, limit = spec.search["seeds"][0], _max_concurrent(spec)
    if spec.search["searcher"] == "grid":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        param_space = {"slot": tune.grid_search(list(todo)), **plan.full_space()}
        return BasicVariantGenerator(random_state=seed, max_concurrent=limit), param_space, 1
    from ray.tune.search import ConcurrencyLimiter

    from .searcher import CellSearch

    metrics, modes = [o["metric"] for o in spec.objectives], [o["mode"] for o in spec.objectives]
    searcher = CellSearch(plan, metrics, modes, seed, todo=todo, done=done, epoch_metric=_epoch_metric(spec))
    if limit:
        searcher = ConcurrencyLimiter(searcher, max_concurrent=limit)
    return searcher, {}, len(todo)


def _epoch_metric(spec: Spec) -> str:
    """The per-epoch value early stopping and Optuna's intermediate values read."""
    metric = spec.search["asha_metric"] or spec.objectives[0]["metric"]
    return EPOCH_METRICS.get(metric, f"val_{metric}")


def _trial_name(keys, trial) -> str:
    return keys[trial.config["slot"]]


def _trial_dirname(keys, trial) -> str:
    return f"{keys[trial.config['slot']]}_{trial.trial_id}"


def _resources(resources: dict):
    """One trial's request: the spec's cpu/gpu, or with workers > 1 a token CPU for the trial, which
    only drives Ray Train; its workers ask for their own (Plan.worker_cpus, see _max_concurrent)."""
    if resources["workers"] > 1:
        return {"cpu": DRIVER_CPU}
    return {k: v for k, v in (("cpu", resources["cpu"]), ("gpu", resources["gpu"])) if v}


def _max_concurrent(spec: Spec) -> int:
    """Trials at once: the spec's cap; for multi-worker trials, at most as many as the cluster can
    give workers (Tune sees only their token CPU and would start them all, each then waiting)."""
    cap = spec.search["max_concurrent"] or 0
    res = spec.resources
    if res["workers"] == 1:
        return cap
    from .connect import cluster_capacity

    capacity = cluster_capacity()
    fits = min(int(capacity.get(key, 0) // (res[field] * res["workers"]))
               for field, key in (("cpu", "CPU"), ("gpu", "GPU")) if res[field])
    return max(1, min(cap or fits, fits))


def _scheduler(plan: Plan, spec: Spec, done: list[dict]):
    from ray.tune.schedulers import FIFOScheduler

    from .early_stop import CellASHA

    search = spec.search
    if search["scheduler"] != "asha":
        return FIFOScheduler()
    mode = next(o["mode"] for o in spec.objectives if o["metric"] == search["asha_metric"])
    return CellASHA(plan, _epoch_metric(spec), mode, done)
