"""The durable files of an experiment: its spec (`spec.json`, what resume reads) and one
JSON record per finished trial (`records/<trial_id>.json`).

The records are the source of truth for the reports (`ranksearch report DIR` rebuilds from them
alone) and for resume: a trial whose valid record exists has finished; every other trial of
the plan runs. Everything here is read as JSON and checked (record_schema.py), never
unpickled or executed: experiments may sit on shared storage others can write. A record that
fails the check is named; resume moves it to `records/.invalid/` and runs its trial again.
Each file is written under a temporary name and moved into place, so a reader never sees half
a record. pyarrow.fs serves local or NFS paths and object-store URIs (s3://, gs://) alike.
"""

from __future__ import annotations

import json
import uuid

import pyarrow.fs as pafs

from .record_schema import MAX_RECORD_BYTES, record_problem

SUFFIX = ".json"
INVALID_DIR = ".invalid"
MAX_SPEC_BYTES = 256 * 1024


def is_uri(path: str) -> bool:
    return "://" in str(path)


def error_line(error) -> str:
    """The last non-empty line of an error or traceback text: where Python puts the message."""
    lines = [line.strip() for line in str(error or "").splitlines() if line.strip()]
    return lines[-1] if lines else "failed (no error text)"


class UnreadableFile(ValueError):
    """A file of the experiment that is not what ranksearch wrote; the message names it."""


class ExperimentFiles:
    def __init__(self, experiment_path: str):
        if is_uri(experiment_path):
            self.fs, root = pafs.FileSystem.from_uri(str(experiment_path))
        else:
            self.fs, root = pafs.LocalFileSystem(), str(experiment_path)
        self.root = root.rstrip("/")
        self.dir = f"{self.root}/records"

    def _write_json(self, path: str, value: dict) -> None:
        folder = path.rsplit("/", 1)[0]
        self.fs.create_dir(folder, recursive=True)
        tmp = f"{folder}/.{uuid.uuid4().hex}.tmp"
        with self.fs.open_output_stream(tmp) as out:
            out.write(json.dumps(value, default=str).encode())
        self.fs.move(tmp, path)

    def _read_json(self, path: str, limit: int):
        """The parsed file, None when there is none; UnreadableFile naming it when it is not JSON."""
        try:
            with self.fs.open_input_stream(path) as f:
                data = f.read(limit + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:  # a directory where a file belongs, no permission, ...
            raise UnreadableFile(f"{path}: cannot be read ({exc})") from None
        if len(data) > limit:
            raise UnreadableFile(f"{path}: larger than {limit:,} bytes; not a file ranksearch wrote")
        try:
            return json.loads(data.decode("utf-8"))
        except UnicodeDecodeError:
            raise UnreadableFile(f"{path}: not UTF-8 text") from None
        except (json.JSONDecodeError, RecursionError) as exc:
            raise UnreadableFile(f"{path}: not valid JSON ({str(exc)[:120]})") from None

    def write_spec(self, spec: dict) -> None:
        self._write_json(f"{self.root}/spec.json", spec)

    def read_spec(self) -> dict | None:
        """spec.json as saved (a mapping), None when absent; UnreadableFile when corrupt.
        The caller validates it like any spec (load_spec)."""
        path = f"{self.root}/spec.json"
        spec = self._read_json(path, MAX_SPEC_BYTES)
        if spec is not None and not isinstance(spec, dict):
            raise UnreadableFile(f"{path}: expected a JSON object, got {type(spec).__name__}")
        return spec

    def write_record(self, record: dict) -> None:
        self._write_json(f"{self.dir}/{record['trial_id']}{SUFFIX}", record)

    def _path(self, name: str) -> str:
        return f"{self.dir}/{name}{SUFFIX}"

    def read_record(self, trial_id: str) -> tuple[dict | None, str | None]:
        """(record, None) for a valid one, (None, why) for one that is there but unusable,
        (None, None) when there is none."""
        try:
            record = self._read_json(self._path(trial_id), MAX_RECORD_BYTES)
        except UnreadableFile as exc:
            return None, str(exc)
        if record is None:
            return None, None
        problem = record_problem(record, trial_id)
        return (None, f"{self._path(trial_id)}: {problem}") if problem else (record, None)

    def get_record(self, trial_id: str) -> dict | None:
        """The valid record of `trial_id`, or None (absent or unusable)."""
        return self.read_record(trial_id)[0]

    def names(self) -> list[str]:
        """Trial ids with a record file, sorted."""
        selector = pafs.FileSelector(self.dir, allow_not_found=True)
        return sorted(info.base_name[: -len(SUFFIX)] for info in self.fs.get_file_info(selector)
                      if info.type == pafs.FileType.File and info.base_name.endswith(SUFFIX)
                      and not info.base_name.startswith("."))

    def scan(self) -> tuple[list[dict], dict[str, str]]:
        """(valid records in trial_id order, {trial_id: why} for the unusable ones)."""
        records, bad = [], {}
        for name in self.names():
            record, problem = self.read_record(name)
            if record is not None:
                records.append(record)
            elif problem:
                bad[name] = problem
        return records, bad

    def records(self) -> list[dict]:
        """Every valid record, in trial_id order; an empty list when there are none yet."""
        return self.scan()[0]

    def set_aside(self, trial_id: str) -> str:
        """Move an unusable record to records/.invalid/ (kept for inspection, out of the way); its new path."""
        folder = f"{self.dir}/{INVALID_DIR}"
        self.fs.create_dir(folder, recursive=True)
        target = f"{folder}/{trial_id}-{uuid.uuid4().hex[:8]}{SUFFIX}"
        self.fs.move(self._path(trial_id), target)
        return target
