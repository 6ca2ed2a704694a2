"""run_search: a spec -> one Ray Tune experiment -> durable records -> reports.

A bad search fails before anything starts: the spec is validated (SpecError), then
connect.py checks resources and storage before any trial is submitted.

Resume semantics: the experiment's records (records.py) say what finished. Tune's
experiment state is restored (`Tuner.restore`: unfinished trials resumed, errored ones
kept as failed); any trial Tune restarts or re-suggests whose record exists reports
that record instead of training (trainable.py), so no finished trial is lost or re-run.
A driver killed before Tune saved any state resumes as a fresh Tuner over the same
records, with the same effect.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ranksearch.search_spaces import load_spec

from .connect import check_shared_storage, connect
from .plan import Plan, build_plan
from .records import ExperimentFiles, error_line, is_uri
from .report import load_reports, write_reports
from .tuner import make_tuner, tune_environment

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
    started = connect(spec, address, job_name=f"ranksearch:{name}")
    import ray

    try:
        check_shared_storage(storage)
        files.write_spec(spec.to_dict())
        with tune_environment():
            grid = make_tuner(plan, spec, storage, name, resume).fit()
        records = collect_records(plan, grid, files)
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


# --- results -------------------------------------------------------------------


def collect_records(plan: Plan, grid, files: ExperimentFiles) -> list[dict]:
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
