"""The Tune experiment of a plan: search algorithm, scheduler, resources, restore."""

from __future__ import annotations

import contextlib
import logging
import os
from functools import partial

from ranksearch.search_spaces import Spec, is_distribution

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


def make_tuner(plan: Plan, spec: Spec, storage: str, name: str, resume: bool):
    """A new Tuner over the plan's slots, or with resume=True the saved one when Tune left state."""
    from ray import tune
    from ray.tune.logger import JsonLoggerCallback

    from .live_report import LiveReport, slot_rows
    from .metrics import SearchMetrics
    from .progress import SearchProgress
    from .trainable import run_trial

    trainable = tune.with_resources(tune.with_parameters(run_trial, plan=plan), _resources(spec.resources))
    path = f"{storage.rstrip('/')}/{name}"
    if resume and tune.Tuner.can_restore(path):
        # Tune re-reads the old trials' result files and warns about those the killed driver never
        # flushed; the records are what counts, so that warning is noise here.
        analysis_log = logging.getLogger("ray.tune.analysis.experiment_analysis")
        level = analysis_log.level
        analysis_log.setLevel(logging.ERROR)
        try:
            return tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=False,
                                      restart_errored=False)
        finally:
            analysis_log.setLevel(level)
    keys = tuple(slot.key for slot in plan.slots)
    search_alg, param_space, num_samples = _search_alg(plan, spec)
    tune_config = tune.TuneConfig(
        search_alg=search_alg, scheduler=_scheduler(spec), num_samples=num_samples,
        time_budget_s=spec.search["time_budget_s"],
        reuse_actors=True,  # one worker process runs many trials: no per-trial process start, imports, data load
        trial_name_creator=partial(_trial_name, keys), trial_dirname_creator=partial(_trial_dirname, keys),
    )
    methods = tuple(slot.cell["method"] for slot in plan.slots)
    run_config = tune.RunConfig(
        name=name, storage_path=storage, verbose=0,
        failure_config=tune.FailureConfig(max_failures=spec.search["max_failures"]),
        callbacks=[SearchProgress(name, methods, spec.objectives), SearchMetrics(name, methods, spec.objectives),
                   LiveReport(plan.experiment_path, name, slot_rows(plan), spec.objectives), JsonLoggerCallback()],
    )
    return tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=run_config)


def _search_alg(plan: Plan, spec: Spec):
    """(search_alg, param_space, num_samples): Tune's grid + sampling, or one Optuna study per cell.
    Sampling is seeded with the first training seed: the same spec draws the same values."""
    from ray import tune

    seed, limit = spec.search["seeds"][0], _max_concurrent(spec)
    if spec.search["searcher"] == "grid":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        param_space = {"slot": tune.grid_search(list(range(len(plan.slots)))), **plan.full_space()}
        return BasicVariantGenerator(random_state=seed, max_concurrent=limit), param_space, 1
    from ray.tune.search import ConcurrencyLimiter

    from .searcher import CellSearch

    metrics, modes = [o["metric"] for o in spec.objectives], [o["mode"] for o in spec.objectives]
    searcher = CellSearch(plan, metrics, modes, seed)
    if limit:
        searcher = ConcurrencyLimiter(searcher, max_concurrent=limit)
    return searcher, {}, len(plan.slots)


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


def _scheduler(spec: Spec):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    search = spec.search
    if search["scheduler"] != "asha":
        return FIFOScheduler()
    metric = search["asha_metric"]
    mode = next(o["mode"] for o in spec.objectives if o["metric"] == metric)
    epochs = sum(_upper(spec.train[k]) for k in ("epochs", "finetune_epochs"))
    # stop_last_trials=False: a trial that reaches the last epoch finishes and writes its record.
    return ASHAScheduler(time_attr="epoch", metric=EPOCH_METRICS[metric], mode=mode, max_t=max(epochs, 1),
                         grace_period=1, stop_last_trials=False)


def _upper(value):
    """The largest value a setting can take (a distribution's upper end)."""
    if not is_distribution(value):
        return value
    ((kind, args),) = value.items()
    return max(args)
