"""run_search: a spec -> one Ray Tune experiment -> durable records -> reports.

A bad search fails before anything starts: the spec is validated (SpecError), then
connect.py checks resources and storage before any trial is submitted.

Resume semantics: the records (records.py) say what finished; nothing else is read back.
Resume re-plans the search from `spec.json` (validated like any spec), sets aside records
that fail their check (`records/.invalid/`), and runs a fresh Tuner over exactly the slots
without a valid record; trials recorded as ok, failed or stopped are kept as they are.
Tune's saved state (tuner.pkl and its snapshots) is never restored: restoring unpickles
it, and experiment folders may be shared storage others can write.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ranksearch.search_spaces import SpecError, load_spec
from ranksearch.search_spaces.schema import NAME_PATTERN

from .connect import check_shared_storage, connect
from .interrupt import InterruptStopper
from .plan import Plan, build_plan
from .preflight import preflight
from .records import ExperimentFiles, error_line, is_uri
from .report import load_reports, write_reports
from .saved_models import keep_only
from .usercode import UserCode, pack_objects, resolve_user_code
from .tuner import make_tuner, tune_environment

DEFAULT_STORAGE = "runs"


@dataclass
class SearchResult:
    experiment_path: str
    report_dir: Path
    records: list[dict] = field(repr=False)
    unfinished: int = 0  # slots without a record: > 0 after an interrupt or a time budget
    interrupted: bool = False  # Ctrl-C stopped it; `ranksearch resume experiment_path` continues

    @property
    def trials(self):
        """trials.parquet as a pandas DataFrame."""
        return load_reports(self.report_dir)["trials"]

    @property
    def pareto(self):
        """pareto.parquet as a pandas DataFrame."""
        return load_reports(self.report_dir)["pareto"]

    @property
    def first_error(self) -> str | None:
        """The error of the first failed trial when every trial failed (a search that did nothing), else None."""
        if not self.records or any(r["status"] != "failed" for r in self.records):
            return None
        return f"{self.records[0]['trial_id']}: {self.records[0].get('error')}"


def run_search(spec, *, storage_path=None, name=None, address=None, resume=False, models=None, dataset=None,
               task=None) -> SearchResult:
    """Run (or with resume=True, continue) the search `spec` describes: a Spec, dict, YAML path or preset.

    The experiment lives at `<storage_path>/<name>` (storage_path: the spec's `storage`,
    else ./runs; name: `<spec name>-<timestamp>`); reports go to its `report/`, the models of
    Pareto-front trials to its `models/<trial_id>.pt`.
    `models={"name": factory}`, `dataset=factory`, `task=Task` hand over Python objects instead
    of import paths (the spec's `models` may then name them; `dataset`/`task` may be left out).
    """
    if models is not None and not (isinstance(models, dict) and all(callable(f) for f in models.values())):
        raise ValueError("models: expected a dict of name -> model factory (a callable returning an nn.Module)")
    if dataset is not None and not callable(dataset):
        raise ValueError("dataset: expected a callable returning (train, val, test) or a dict of them")
    spec = load_spec(spec, user_models=tuple(models or ()), user_dataset=dataset is not None, user_task=task is not None)
    code = UserCode(os.getcwd(), pack_objects(models, dataset, task))
    spec = resolve_user_code(spec, code)
    storage = str(storage_path or spec.storage or DEFAULT_STORAGE)
    storage = storage if is_uri(storage) else os.path.abspath(os.path.expanduser(storage))
    if name is not None and not NAME_PATTERN.fullmatch(str(name)):
        raise ValueError(f"--name: expected letters, digits, '_', '.' or '-' (it names a folder inside the "
                         f"storage), got {str(name)[:80]!r}")
    name = name or f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    preflight(spec, local=not (address or os.environ.get("RAY_ADDRESS")))
    check_storage(storage)
    experiment_path = f"{storage.rstrip('/')}/{name}"
    plan = build_plan(spec, experiment_path, code.as_plan() if code.used_by(spec) else None)
    files = ExperimentFiles(experiment_path)
    if not resume and files.read_spec() is not None:
        raise ValueError(f"--name: experiment {experiment_path} exists; continue it with "
                         f"`ranksearch resume {experiment_path}` or choose another name")
    if address and address.startswith("ray://") and not is_uri(storage):
        raise ValueError(f"--storage: with a ray:// address, trials run on the cluster and the driver "
                         f"here: use storage both reach (s3://, gs://), or `ranksearch submit`; got {storage!r}")
    done = usable_records(plan, files) if resume else {}
    todo = tuple(slot.index for slot in plan.slots if slot.key not in done)
    stopper = InterruptStopper()
    if todo:
        started = connect(spec, address, job_name=f"ranksearch:{name}")
        import ray

        try:
            check_shared_storage(storage)
            files.write_spec(spec.to_dict())
            with tune_environment(), stopper.catching():
                tuner, scheduler = make_tuner(plan, spec, storage, name, todo, list(done.values()), stopper)
                grid = tuner.fit()
            collect_records(plan, grid, files, getattr(scheduler, "history", {}), getattr(scheduler, "stopped", set()))
        finally:
            if started:
                ray.shutdown()
    records = [r for r in files.records() if r["trial_id"] in {slot.key for slot in plan.slots}]
    unfinished = len(plan.slots) - len(records)
    report_dir = _publish_reports(records, experiment_path, spec.objectives)
    _keep_front_models(experiment_path, report_dir)
    return SearchResult(experiment_path, report_dir, records, unfinished, stopper.hit)


def check_storage(storage: str) -> None:
    """--storage must be a folder (or a URI pyarrow can reach), caught before anything runs."""
    if is_uri(storage):
        import pyarrow.fs as pafs

        try:
            fs, root = pafs.FileSystem.from_uri(storage)
            fs.get_file_info(root)
        except (OSError, ValueError) as exc:
            raise ValueError(f"--storage: cannot reach {storage} ({str(exc).splitlines()[0][:200]})") from None
        return
    path = Path(storage)
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise ValueError(f"--storage: {existing} is a file; expected a folder for experiments")
    if existing is not None and not os.access(existing, os.W_OK):
        raise ValueError(f"--storage: {existing} is not writable")


def usable_records(plan: Plan, files: ExperimentFiles) -> dict[str, dict]:
    """The valid records of the plan's slots, by trial key. Unusable ones (corrupt, foreign, not
    matching their slot) are moved to records/.invalid/ and named on stderr: their trials run again."""
    slots = {slot.key: slot for slot in plan.slots}
    records, bad = files.scan()
    done = {}
    for record in records:
        slot = slots.get(record["trial_id"])
        if slot is None:
            continue  # not a trial of this spec: left alone, not reported
        mismatch = [k for k in ("model", "method", "format") if record.get(k) != slot.cell[k]]
        if mismatch:
            bad[slot.key] = f"{files.dir}/{slot.key}.json: {mismatch[0]} {record.get(mismatch[0])!r} is not its trial's"
            continue
        done[slot.key] = record
    for key, problem in bad.items():
        moved = files.set_aside(key)
        print(f"ranksearch: unusable record set aside, its trial runs again: {problem} (now {moved})",
              file=sys.stderr, flush=True)
    return done


def _keep_front_models(experiment_path: str, report_dir: Path) -> None:
    """Only Pareto-front trials keep their saved model (saved_models.py)."""
    try:
        front = set(load_reports(report_dir)["pareto"]["trial_id"])
    except Exception:  # no front (no finished trial): keep what is there
        return
    keep_only(experiment_path, front)


def resume_search(experiment_path: str, *, address=None, models=None, dataset=None, task=None) -> SearchResult:
    """Continue the search at `experiment_path` (a directory `run_search` made) with the spec it saved."""
    path = str(experiment_path).rstrip("/")
    path = path if is_uri(path) else os.path.abspath(path)
    spec = ExperimentFiles(path).read_spec()
    if spec is None:
        raise FileNotFoundError(f"{path}: no spec.json here; not a ranksearch experiment directory")
    try:
        spec = load_spec(spec, user_models=tuple(models or ()), user_dataset=dataset is not None,
                         user_task=task is not None)
    except SpecError as exc:
        raise SpecError(exc.errors, f"{path}/spec.json") from None
    storage, _, name = path.rpartition("/")
    return run_search(spec, storage_path=storage, name=name, address=address, resume=True, models=models,
                      dataset=dataset, task=task)


def regenerate_reports(experiment_path: str) -> tuple[Path, dict[str, str]]:
    """Rebuild the reports of an experiment from its records alone (`ranksearch report DIR`):
    (report dir, {trial_id: why} for the records left out as unreadable)."""
    files = ExperimentFiles(experiment_path)
    spec = files.read_spec()
    records, bad = files.scan()
    if spec is None and not records and not bad:
        raise FileNotFoundError(f"{experiment_path}: no spec.json and no records/; not a ranksearch experiment")
    try:
        objectives = load_spec(spec).objectives if spec else None
    except SpecError as exc:
        raise SpecError(exc.errors, f"{files.root}/spec.json") from None
    return _publish_reports(records, experiment_path, objectives), bad


# --- results -------------------------------------------------------------------


def collect_records(plan: Plan, grid, files: ExperimentFiles, history: dict | None = None,
                    stopped: set | None = None) -> list[dict]:
    """All records: the trials' own, plus ones written here for trials that never wrote one:
    Tune errors after max_failures retries (failed) and early stops by the scheduler (stopped,
    with the rows the scheduler saw). A trial cut short otherwise (Ctrl-C, time budget) gets
    no record, so resume runs it."""
    history, stopped = history or {}, stopped or set()
    for result in grid:
        config = getattr(result, "config", None) or {}
        if "slot" not in config:
            continue  # never started
        slot = plan.slots[config["slot"]]
        metrics = result.metrics or {}
        if files.get_record(slot.key) is not None:
            continue
        record = plan.base_record(slot, config) | {"tune_trial_id": metrics.get("trial_id")}
        if result.error:
            record |= {"status": "failed", "error": error_line(result.error), "history": history.get(slot.key, [])}
        elif slot.key in stopped:
            record |= stopped_record(history.get(slot.key, []), plan.spec["objectives"])
        else:
            continue
        files.write_record(record)
    return files.records()


def stopped_record(rows: list[dict], objectives: list[dict]) -> dict:
    """What a stopped trial keeps: its rows, epochs_done, and the metrics of its last epoch
    (`accuracy` = the validation accuracy at the stop; `stopped_phase` says whether the model was
    at its budget then)."""
    last = rows[-1] if rows else {}
    record = {"status": "stopped", "error": f"stopped by the scheduler after {len(rows)} epoch(s)",
              "history": rows, "epochs_done": last.get("epoch", len(rows)), "params": last.get("params"),
              "stopped_phase": last.get("phase")}
    for key, value in last.items():
        if key.startswith("val_"):
            record[key[len("val_"):]] = value
    return record


def _publish_reports(records: list[dict], experiment_path: str, objectives) -> Path:
    """Reports in `<experiment>/report/`; for an object-store experiment, written here first, then uploaded."""
    if not is_uri(experiment_path):
        return write_reports(records, Path(experiment_path, "report"), objectives=objectives).report_dir
    import pyarrow.fs as pafs

    local = Path(tempfile.mkdtemp(prefix="ranksearch-report-"))
    write_reports(records, local, objectives=objectives)
    pafs.copy_files(str(local), f"{experiment_path}/report")
    return local
