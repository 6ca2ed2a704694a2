"""run_search: a spec -> one Ray Tune experiment -> durable records -> reports.

Order of checks, so a bad search fails before anything starts: the spec is validated
(SpecError), then (local Ray) the trial resources are checked against this machine
before Ray starts, or (a cluster) against what the cluster offers or can scale to,
and the storage against the nodes, before any trial is submitted.

Storage rule: a search is multi-node when Ray reports more than one alive node. Its
storage must then be reachable from every node: an object-store URI (s3://, gs://, ...)
is taken as shared; a path is checked by writing a probe file from the driver and
looking for it from a zero-CPU task pinned to each node, so an NFS mount passes and a
node-local directory fails with the nodes named. Nodes an autoscaler adds later cannot
be probed: then a local path gets a warning, and Ray's own storage check fails the
trials that land on a node without it.

Resume semantics: the experiment's records (records.py) say what finished. Tune's
experiment state is restored (`Tuner.restore`, unfinished trials resumed, errored ones
kept as failed); any trial Tune restarts or re-suggests whose record exists reports
that record instead of training (trainable.py), so no finished trial is lost or re-run.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import uuid
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from search_spaces import Spec, SpecError, is_distribution, load_spec

from .plan import EPOCH_METRICS, Plan, build_plan
from .records import ExperimentFiles, error_line, is_uri
from .report import load_reports, write_reports

DEFAULT_STORAGE = "runs"


@dataclass
class SearchResult:
    experiment_path: str
    report_dir: Path
    records: list[dict] = field(repr=False)

    @property
    def trials(self):
        """trials.parquet as a pandas DataFrame."""
        return load_reports(self.report_dir)["trials"]

    @property
    def pareto(self):
        """pareto.parquet as a pandas DataFrame."""
        return load_reports(self.report_dir)["pareto"]


def run_search(spec, *, storage_path=None, name=None, address=None, resume=False) -> SearchResult:
    """Run (or with resume=True, continue) the search `spec` describes: a Spec, dict, YAML path or preset.

    The experiment lives at `<storage_path>/<name>` (storage_path: the spec's `storage`,
    else ./runs; name: `<spec name>-<timestamp>`); reports go to its `report/`.
    """
    spec = load_spec(spec)
    storage = str(storage_path or spec.storage or DEFAULT_STORAGE)
    storage = storage if is_uri(storage) else os.path.abspath(os.path.expanduser(storage))
    name = name or f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    experiment_path = f"{storage.rstrip('/')}/{name}"
    plan = build_plan(spec, experiment_path)
    files = ExperimentFiles(experiment_path)
    if not resume and files.read_spec() is not None:
        raise ValueError(f"--name: experiment {experiment_path} exists; continue it with "
                         f"`ranksearch resume {experiment_path}` or choose another name")
    if address and address.startswith("ray://") and not is_uri(storage):
        raise ValueError(f"--storage: with a ray:// address, trials run on the cluster and the driver "
                         f"here: use storage both reach (s3://, gs://), or `ranksearch submit`; got {storage!r}")
    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"  # relative data paths stay relative to where the search started
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the legacy reporter honours verbose=0: our progress lines only
    # Trials report per-epoch rows (ASHA's metric) and one final record (the searcher's objectives):
    # no single result carries every metric, which Tune's strict check would demand.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    started = _connect(spec, address)
    import ray

    try:
        _check_shared_storage(storage)
        files.write_spec(spec.to_dict())
        grid = _tuner(plan, spec, storage, name, resume).fit()
        records = _records(plan, grid, files)
    finally:
        if started:
            ray.shutdown()
    return SearchResult(experiment_path, _publish_reports(records, experiment_path, spec.objectives), records)


def resume_search(experiment_path: str, *, address=None) -> SearchResult:
    """Continue the search at `experiment_path` (a directory `run_search` made) with the spec it saved."""
    path = str(experiment_path).rstrip("/")
    path = path if is_uri(path) else os.path.abspath(path)
    spec = ExperimentFiles(path).read_spec()
    if spec is None:
        raise FileNotFoundError(f"{path}: no spec.json here; not a ranksearch experiment directory")
    storage, _, name = path.rpartition("/")
    return run_search(spec, storage_path=storage, name=name, address=address, resume=True)


def regenerate_reports(experiment_path: str) -> Path:
    """Rebuild the reports of an experiment from its records alone (`ranksearch report DIR`)."""
    files = ExperimentFiles(experiment_path)
    spec, records = files.read_spec(), files.records()
    if spec is None and not records:
        raise FileNotFoundError(f"{experiment_path}: no spec.json and no records/; not a ranksearch experiment")
    return _publish_reports(records, experiment_path, spec["objectives"] if spec else None)


# --- Ray -----------------------------------------------------------------------


def _connect(spec: Spec, address: str | None) -> bool:
    """Use the Ray this process already joined, a cluster (`address`, else $RAY_ADDRESS, which a Ray
    job's driver has), or a new local Ray sized to this machine; check that a trial fits. True if
    connected here (then the caller shuts down)."""
    import ray

    started = not ray.is_initialized()
    if started:
        quiet = {"logging_level": logging.WARNING, "log_to_driver": False}
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            try:
                ray.init(address=address, **quiet)
            except ConnectionError as exc:
                raise ValueError(f"--address: no Ray cluster at {address!r}: {exc}") from None
        else:
            cpus, gpus = os.cpu_count() or 1, _local_gpus()
            spec.check_resources({"CPU": cpus, "GPU": gpus})  # before Ray starts: nothing to clean up
            # address="local": a new Ray even when a `ray start` cluster on this machine would be found
            ray.init(address="local", num_cpus=cpus, num_gpus=gpus, dashboard_host="127.0.0.1", **quiet)
    try:
        spec.check_resources(_cluster_capacity())  # a trial that can never fit would wait forever
    except BaseException:
        if started:
            ray.shutdown()
        raise
    return started


def _local_gpus() -> int:
    import torch  # already imported by the spec's model tables

    return torch.cuda.device_count()


def _cluster_capacity() -> dict:
    """What the cluster offers now, or what its autoscaler can grow to if that is more."""
    import ray

    capacity = dict(ray.cluster_resources())
    try:  # private API (pinned ray 2.60), the one Ray Train uses for the same question
        from ray._private.state import state

        grow_to = state.get_max_resources_from_cluster_config() or {}
    except Exception:
        grow_to = {}
    return {k: max(capacity.get(k, 0), grow_to.get(k, 0)) for k in {*capacity, *grow_to}}


def _check_shared_storage(storage: str) -> None:
    import ray

    nodes = [n for n in ray.nodes() if n["Alive"]]
    if is_uri(storage):
        return
    if len(nodes) < 2:
        if _cluster_capacity() != dict(ray.cluster_resources()):
            warnings.warn(f"storage {storage!r} is a local path and the cluster can add nodes: "
                          "make sure every node mounts it (NFS), or use s3:// / gs://", stacklevel=3)
        return
    os.makedirs(storage, exist_ok=True)
    probe = Path(storage, f".ranksearch-probe-{uuid.uuid4().hex}")
    probe.touch()
    try:
        seen = _probe(str(probe), [n["NodeID"] for n in nodes])
    finally:
        probe.unlink()
    blind = [f"{n['NodeManagerAddress']} (node {n['NodeID'][:12]})" for n, ok in zip(nodes, seen) if not ok]
    if blind:
        raise SpecError([
            f"storage: {storage!r} is not visible from node(s) {', '.join(blind)}: a multi-node search needs "
            "storage every node shares, an NFS mount or s3:// / gs:// (spec `storage:` or --storage)"
        ])


def _probe(path: str, node_ids: list[str]) -> list[bool]:
    """Whether `path` exists, seen from each node (a zero-CPU task pinned to it)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    exists = ray.remote(num_cpus=0)(os.path.exists)
    pinned = [exists.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)) for node in node_ids]
    return ray.get([task.remote(path) for task in pinned], timeout=120)


# --- Tune ----------------------------------------------------------------------


def _tuner(plan: Plan, spec: Spec, storage: str, name: str, resume: bool):
    from ray import tune

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
    run_config = tune.RunConfig(
        name=name, storage_path=storage, verbose=0,
        failure_config=tune.FailureConfig(max_failures=spec.search["max_failures"]),
        callbacks=[SearchProgress(name, len(plan.slots), spec.objectives)],
    )
    return tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=run_config)


def _search_alg(plan: Plan, spec: Spec):
    """(search_alg, param_space, num_samples): Tune's grid + sampling, or one Optuna study per cell.
    Sampling is seeded with the first training seed: the same spec draws the same values."""
    from ray import tune

    search, seed = spec.search, spec.search["seeds"][0]
    if search["searcher"] == "grid":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        param_space = {"slot": tune.grid_search(list(range(len(plan.slots)))), **plan.full_space()}
        return BasicVariantGenerator(random_state=seed, max_concurrent=search["max_concurrent"] or 0), param_space, 1
    from ray.tune.search import ConcurrencyLimiter

    from .searcher import CellSearch

    metrics, modes = [o["metric"] for o in spec.objectives], [o["mode"] for o in spec.objectives]
    searcher = CellSearch(plan, metrics, modes, seed)
    if search["max_concurrent"]:
        searcher = ConcurrencyLimiter(searcher, max_concurrent=search["max_concurrent"])
    return searcher, {}, len(plan.slots)


def _trial_name(keys, trial) -> str:
    return keys[trial.config["slot"]]


def _trial_dirname(keys, trial) -> str:
    return f"{keys[trial.config['slot']]}_{trial.trial_id}"


def _resources(resources: dict):
    from ray import tune

    bundle = {k: v for k, v in (("CPU", resources["cpu"]), ("GPU", resources["gpu"])) if v}
    if resources["workers"] == 1:
        return {key.lower(): v for key, v in bundle.items()}
    return tune.PlacementGroupFactory([bundle] * resources["workers"], strategy="PACK")


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


# --- results -------------------------------------------------------------------


def _records(plan: Plan, grid, files: ExperimentFiles) -> list[dict]:
    """All records: the trials' own, plus ones written here for trials that never wrote one
    (Tune errors after max_failures retries: failed; early stops by the scheduler: stopped)."""
    for result in grid:
        slot = plan.slots[result.config["slot"]]
        metrics = result.metrics or {}
        if files.get_record(slot.key) is not None or not (metrics or result.error):
            continue  # has its record, or never ran
        record = plan.base_record(slot, result.config) | {"tune_trial_id": metrics.get("trial_id")}
        if result.error:
            record |= {"status": "failed", "error": error_line(result.error)}
        else:
            record |= {"status": "stopped", "error": None, "epochs_done": metrics.get("epoch"),
                       "params": metrics.get("params")}
        files.write_record(record)
    return files.records()


def _publish_reports(records: list[dict], experiment_path: str, objectives) -> Path:
    """Reports in `<experiment>/report/`; for an object-store experiment, written here first, then uploaded."""
    if not is_uri(experiment_path):
        return write_reports(records, Path(experiment_path, "report"), objectives=objectives).report_dir
    import pyarrow.fs as pafs

    local = Path(tempfile.mkdtemp(prefix="ranksearch-report-"))
    write_reports(records, local, objectives=objectives)
    pafs.copy_files(str(local), f"{experiment_path}/report")
    return local
