"""Orchestration overhead per trial: ranksearch's run_search against a bare Ray Tune function trainable.

Both run the same trivial trials (MLP on a 300-image digits subset, one epoch, TT at
max rank 4) on a 2-CPU Ray, one CPU per trial. Overhead per trial =
(search wall time - sum of the trials' training time) / trials, where training time is
the `fit` call alone (data loading counts as overhead: caching it is part of the job).
With two trials at a time the wall clock hides some overhead, so the table also gives
it per CPU slot: (2 x wall - sum of training) / trials.
"""

from __future__ import annotations

import os
import tempfile
import time

CPUS = 2
TRAIN = {"epochs": 1, "finetune_epochs": 0, "max_rank": 4}
DATA = {"max_train": 300}


def _bare_trainable(config):
    """What a user writes without ranksearch: load, fit, report once."""
    from ray import tune

    from ranksearch.models.data import load_dataset
    from ranksearch.models.train import fit

    data = load_dataset("digits", seed=config["seed"], **DATA)
    start = time.perf_counter()
    record = fit(model="mlp", dataset="digits", data=data, method="fixed", format="tt", budget=0.2,
                 train={**TRAIN, "seed": config["seed"]})
    tune.report({"accuracy": record["accuracy"], "train_s": time.perf_counter() - start})


def bare_tune(trials: int, storage: str) -> tuple[float, float]:
    from ray import tune

    start = time.perf_counter()
    tuner = tune.Tuner(
        tune.with_resources(_bare_trainable, {"cpu": 1}),
        param_space={"seed": tune.grid_search(list(range(trials)))},
        run_config=tune.RunConfig(storage_path=storage, name="bare", verbose=0),
    )
    grid = tuner.fit()
    wall = time.perf_counter() - start
    return wall, sum(r.metrics["train_s"] for r in grid)


def ranksearch(trials: int, storage: str) -> tuple[float, float]:
    from ranksearch.orchestrator import run_search

    spec = {
        "name": "overhead", "models": ["mlp"], "dataset": "digits", "dataset_options": DATA,
        "formats": ["tt"], "methods": {"fixed": {}}, "budgets": [0.2], "train": TRAIN,
        "search": {"seeds": list(range(trials))}, "resources": {"cpu": 1},
    }
    start = time.perf_counter()
    result = run_search(spec, storage_path=storage, name="ranksearch")
    wall = time.perf_counter() - start
    return wall, sum(r["wall_time_s"] for r in result.records)


def run(quick: bool = False) -> dict:
    import ray

    trials = 12 if quick else 40
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=CPUS, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench-orchestration-") as storage:
            for name, runner in (("bare Ray Tune", bare_tune), ("ranksearch run_search", ranksearch)):
                wall, train = runner(trials, storage)
                rows.append({
                    "runner": name, "trials": trials, "cpus": CPUS, "wall_s": round(wall, 2),
                    "train_s": round(train, 2), "overhead_per_trial_s": round((wall - train) / trials, 3),
                    "overhead_per_slot_s": round((CPUS * wall - train) / trials, 3),
                    "load_avg_1m": round(os.getloadavg()[0], 1),
                })
    finally:
        if started:
            ray.shutdown()
    return {"rows": rows, "markdown": _markdown(rows)}


def _markdown(rows: list[dict]) -> str:
    head = ("| runner | trials | wall s | Σ training s | overhead / trial s | overhead / CPU slot s | load avg |\n"
            "|---|---:|---:|---:|---:|---:|---:|")
    body = [f"| {r['runner']} | {r['trials']} | {r['wall_s']} | {r['train_s']} | {r['overhead_per_trial_s']} | "
            f"{r['overhead_per_slot_s']} | {r['load_avg_1m']} |" for r in rows]
    note = ("Trivial trials (MLP, 300 digits images, 1 epoch) on a 2-CPU Ray, one CPU each. Overhead per trial = "
            "(wall - Σ training) / trials; per CPU slot = (2 x wall - Σ training) / trials. Training = the `fit` "
            "call; data loading and imports count as overhead. Bare Tune: function trainable, default settings.")
    return "\n".join([head, *body, "", note])


if __name__ == "__main__":
    import json
    import sys

    out = run(quick="--quick" in sys.argv)
    print(out["markdown"])
    print(json.dumps(out["rows"], indent=2))
