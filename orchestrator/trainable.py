"""The Tune trainable: one slot of the plan -> one `fit` run -> one durable record.

- A trial whose record already exists reports it again instead of training: after a
  resume, Tune may restart trials that had in fact finished (its experiment snapshot
  lags), and they must not run twice.
- Errors inside `fit` (bad hyperparameters, NaN loss, out of memory) end the trial as
  `failed` with the error text, reported like any result, so the search goes on and a
  deterministic failure is not retried. Only infrastructure failures (a dead worker,
  a lost node) reach Tune, which retries them `search.max_failures` times.
- Per worker process, the data set is loaded once: with actor reuse, one process runs
  many trials.
- Each epoch's row goes to Tune (`tune.report`), for ASHA and the trial's result.json;
  the end result is the record itself, so no checkpoint is written per epoch: `fit`
  exposes no training state, and a row alone could not resume anything.

Set RANKSEARCH_TRIAL_LOG=FILE to append "<trial_id>\\n" to FILE whenever a trial
starts training: an audit trail that shows what a resume re-ran (tests use it).
"""

from __future__ import annotations

import functools
import json
import os
import time

import ray
from ray import tune

from .plan import Plan, Slot, fit_budget
from .records import RecordStore

TRIAL_LOG_ENV = "RANKSEARCH_TRIAL_LOG"
SUMMARY_FIELDS = ("trial_id", "status", "error", "model", "format", "method", "budget", "budget_params", "seed",
                  "accuracy", "auc", "logloss", "params", "dense_params", "tensorized_params", "compression", "wall_time_s")


def run_trial(config: dict, plan: Plan) -> None:
    slot = plan.slots[config["slot"]]
    store = RecordStore(plan.experiment_path)
    record = store.get(slot.key)
    if record is None:
        record = _train(slot, config, plan)
        store.write(record)
    tune.report(summary(record))


def summary(record: dict) -> dict:
    """The flat end result Tune sees: enough for the progress line, the searcher and the metrics."""
    return {k: record.get(k) for k in SUMMARY_FIELDS} | {"done_record": True}


def _train(slot: Slot, config: dict, plan: Plan) -> dict:
    from models.train import fit

    spec, cell = plan.spec, slot.cell
    train, method_params = plan.hyperparameters(slot, config)
    _log_start(slot.key)
    context = ray.get_runtime_context()
    identity = {"trial_id": slot.key, "sample": slot.sample, "tune_trial_id": tune.get_context().get_trial_id(),
                "node_id": context.get_node_id(), "node_ip": ray.util.get_node_ip_address()}
    budget = None if isinstance(cell["budget"], dict) else cell["budget"]  # absolute: see budget_params
    start = time.perf_counter()
    try:
        data = _dataset(spec["dataset"], slot.seed, json.dumps(spec["dataset_options"], sort_keys=True))
        result = fit(model=cell["model"], dataset=spec["dataset"], data=data, method=cell["method"],
                     format=cell["format"], budget=fit_budget(cell["budget"]), train=train,
                     method_params=method_params, on_epoch=tune.report)
    except Exception as exc:  # the trial's own failure: recorded, not retried (see module doc)
        return {**identity, "model": cell["model"], "dataset": spec["dataset"], "format": cell["format"],
                "method": cell["method"], "budget": budget, "budget_params": None if budget else fit_budget(cell["budget"]),
                "seed": slot.seed, "config": {**train, **method_params},
                "status": "failed", "error": f"{type(exc).__name__}: {exc}", "wall_time_s": time.perf_counter() - start}
    return {**result, **identity, "budget": budget, "status": "ok", "error": None}


@functools.lru_cache(maxsize=2)
def _dataset(dataset: str, seed: int, options_json: str):
    from models.data import load_dataset

    return load_dataset(dataset, seed=seed, **json.loads(options_json))


def _log_start(trial_id: str) -> None:
    path = os.environ.get(TRIAL_LOG_ENV)
    if path:
        with open(path, "a") as log:
            log.write(f"{trial_id}\n")
