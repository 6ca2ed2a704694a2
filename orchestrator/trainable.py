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
- With resources.workers > 1 the trial is a driver: `models.distributed.fit_distributed`
  runs `fit` sharded over that many Ray Train workers, each with the spec's cpu/gpu.
- Each epoch's row is kept in the record (`history`) and reported to Tune only when the
  scheduler reads it (ASHA): every report is a round trip through the Tune driver. The
  end result is the record itself, so no checkpoint is written per epoch: `fit` exposes
  no training state, and a row alone could not resume anything.

With RANKSEARCH_TRIAL_LOG=FILE set for the driver, every trial appends "<trial_id>\\n"
to FILE when it starts training: an audit trail of what ran (tests use it to prove a
resume re-ran nothing).
"""

from __future__ import annotations

import functools
import json
import shutil
import tempfile
import time

import ray
from ray import tune

from ranksearch.models.sources import is_import_path
from ranksearch.search_spaces.schema import is_user_model

from .plan import Plan, Slot, fit_budget
from .records import ExperimentFiles
from .saved_models import save_trial_model

SUMMARY_FIELDS = ("status", "error", "model", "format", "method", "budget", "budget_params", "seed",
                  "accuracy", "auc", "logloss", "params", "dense_params", "tensorized_params", "compression",
                  "wall_time_s")


def run_trial(config: dict, plan: Plan) -> None:
    slot = plan.slots[config["slot"]]
    files = ExperimentFiles(plan.experiment_path)
    record = files.get_record(slot.key)
    if record is None:
        record = _train(slot, config, plan)
        files.write_record(record)
    tune.report(summary(record, plan.spec["objectives"]))


def summary(record: dict, objectives=()) -> dict:
    """The flat end result Tune sees: enough for the progress line, the searcher and the metrics
    (a task's own metric included). (Tune fills `trial_id` with its own id; the key is its name.)"""
    fields = (*SUMMARY_FIELDS, *(o["metric"] for o in objectives))
    return {k: record.get(k) for k in fields} | {"done_record": True}


def _train(slot: Slot, config: dict, plan: Plan) -> dict:
    train, method_params = plan.hyperparameters(slot, config)
    base = plan.base_record(slot, config)
    base |= {"tune_trial_id": tune.get_context().get_trial_id(), "node_id": ray.get_runtime_context().get_node_id(),
             "node_ip": ray.util.get_node_ip_address()}
    if plan.trial_log:
        with open(plan.trial_log, "a") as log:
            log.write(f"{slot.key}\n")
    history = []

    def on_epoch(row: dict) -> None:
        history.append(row)
        if plan.report_epochs:
            tune.report(row)

    fit_kwargs = {"model": base["model"], "dataset": base["dataset"], "method": base["method"],
                  "format": base["format"], "budget": fit_budget(slot.cell["budget"]), "train": train,
                  "method_params": method_params, "model_options": plan.spec.get("model_options") or {},
                  "shapes": (plan.spec.get("shapes") or {}).get(base["model"])}
    start = time.perf_counter()
    try:
        result = _fit(plan, slot, fit_kwargs, on_epoch)
    except Exception as exc:  # the trial's own failure: recorded, not retried (see module doc)
        return base | {"status": "failed", "error": f"{type(exc).__name__}: {exc}", "history": history,
                       "epochs_done": len(history), "wall_time_s": time.perf_counter() - start}
    identity = {k: base[k] for k in ("trial_id", "sample", "budget", "tune_trial_id", "node_id", "node_ip")}
    return {"history": history} | result | identity | {"status": "ok", "error": None}


def _fit(plan: Plan, slot: Slot, fit_kwargs: dict, on_epoch) -> dict:
    """`fit` here on the cached data, or sharded over Ray Train workers (its record has the history);
    a user's own model goes through `compress`. Each finished trial saves its model (saved_models.py)."""
    resources, options = plan.spec["resources"], plan.spec["dataset_options"]
    if is_user_model(fit_kwargs["model"]):
        return _fit_user(plan, slot, fit_kwargs, on_epoch)
    if plan.spec["init"] == "pretrained":
        fit_kwargs = fit_kwargs | {"init": "pretrained", "checkpoint": _checkpoint(plan, fit_kwargs["model"])}
    if resources["workers"] == 1:
        from ranksearch.models.train import fit

        data = _dataset(fit_kwargs["dataset"], slot.seed, json.dumps(options, sort_keys=True))
        if fit_kwargs["method"] == "dense":  # the uncompressed baseline: the user has it (a DLRM's may be GBs)
            return fit(**fit_kwargs, data=data, on_epoch=on_epoch)
        with tempfile.TemporaryDirectory() as tmp:
            record = fit(**fit_kwargs, data=data, on_epoch=on_epoch, save=f"{tmp}/model.pt")
            save_trial_model(plan.experiment_path, slot.key, lambda path: shutil.copyfile(f"{tmp}/model.pt", path))
        return record
    from ranksearch.models.distributed import fit_distributed

    return fit_distributed(
        num_workers=resources["workers"], use_gpu=resources["gpu"] > 0, cpus_per_worker=plan.worker_cpus,
        gpus_per_worker=resources["gpu"] or None, storage_path=f"{plan.experiment_path}/train", name=slot.key,
        callbacks=_epoch_callbacks(plan), dataset_options=options, **fit_kwargs,
    )


def _epoch_callbacks(plan: Plan) -> list | None:
    """Where the workers' epoch rows go: this trial's intermediate results, when the plan reports epochs."""
    if not plan.report_epochs:
        return None
    from ray.tune.integration.ray_train import TuneReportCallback

    return [TuneReportCallback()]


def _checkpoint(plan: Plan, model: str) -> str:
    given = plan.spec["checkpoint"]
    path = given if isinstance(given, str) else given[model]
    return _code(plan).path(path) if plan.code is not None else path


def _code(plan: Plan):
    from .usercode import UserCode

    return UserCode(**plan.code)


def _fit_user(plan: Plan, slot: Slot, fit_kwargs: dict, on_epoch) -> dict:
    """A user's model factory on the user's data, through `compress` (the same strategies as fit)."""
    import torch

    from ranksearch.models.checkpoint import save_compressed
    from ranksearch.models.compress import compress
    from ranksearch.models.tasks import task_options

    spec, code, label = plan.spec, _code(plan), fit_kwargs["model"]
    data = _user_dataset(code, spec["dataset"], json.dumps(spec["dataset_options"], sort_keys=True))
    net = code.model_factory(label)(**spec["model_options"])
    if spec["init"] == "pretrained":
        net.load_state_dict(torch.load(_checkpoint(plan, label), map_location="cpu", weights_only=True))
    task = code.task(spec["task"])
    train = dict(fit_kwargs["train"])
    epochs, max_rank, seed = train.pop("epochs"), train.pop("max_rank"), train.pop("seed")
    train.pop("batch_size", None)  # the user's batches are what they are
    result = compress(net, data["train"], data["val"], test_data=data["test"], method=fit_kwargs["method"],
                      format=fit_kwargs["format"], budget=fit_kwargs["budget"], epochs=epochs, init=spec["init"],
                      max_rank=max_rank, seed=seed, train=train, method_params=fit_kwargs["method_params"],
                      progress=False, on_epoch=on_epoch, shapes=fit_kwargs["shapes"],
                      **(task_options(task) if task is not None else {}))
    record = result.record | {"model": label, "dataset": spec["dataset"], "model_options": spec["model_options"]}
    source = {"kind": "import", "path": label} if is_import_path(label) else {"kind": "module", "class": label}
    if fit_kwargs["method"] != "dense":
        save_trial_model(plan.experiment_path, slot.key, lambda path: save_compressed(
            path, result.model, record | {"trial_id": slot.key}, spec["model_options"], source=source))
    return record


_USER_DATA: dict = {}


def _user_dataset(code, dataset: str, options_json: str) -> dict:
    """Per worker process, the user's dataset factory is called once per (dataset, options)."""
    from ranksearch.models.data.loaders import splits

    key = (code.project_dir, dataset, options_json)
    if key not in _USER_DATA:
        _USER_DATA.clear()
        _USER_DATA[key] = splits(code.dataset_factory(dataset)(**json.loads(options_json)), "dataset")
    return _USER_DATA[key]


@functools.lru_cache(maxsize=2)
def _dataset(dataset: str, seed: int, options_json: str):
    from ranksearch.models.data import load_dataset

    return load_dataset(dataset, seed=seed, **json.loads(options_json))
