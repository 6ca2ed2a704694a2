"""The durable files of an experiment: its spec (`spec.json`, what resume reads) and one
JSON record per finished trial (`records/<trial_id>.json`).

The records are the source of truth for the reports (`ranksearch report DIR` rebuilds from them
alone) and for resume: a trial whose record exists has finished, whatever Tune's own
experiment snapshot says. Each file is written under a temporary name and moved into
place, so a reader never sees half a record. pyarrow.fs serves local or NFS paths and
object-store URIs (s3://, gs://) with the same code.
"""

from __future__ import annotations

import json
import uuid

import pyarrow.fs as pafs

SUFFIX = ".json"


def is_uri(path: str) -> bool:
    return "://" in str(path)


def error_line(error) -> str:
    """The last non-empty line of an error or traceback text: where Python puts the message."""
    lines = [line.strip() for line in str(error or "").splitlines() if line.strip()]
    return lines[-1] if lines else "failed (no error text)"


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

    def _read_json(self, path: str) -> dict | None:
        try:
            with self.fs.open_input_stream(path) as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None

    def write_spec(self, spec: dict) -> None:
        self._write_json(f"{self.root}/spec.json", spec)

    def read_spec(self) -> dict | None:
        return self._read_json(f"{self.root}/spec.json")

    def write_record(self, record: dict) -> None:
        self._write_json(f"{self.dir}/{record['trial_id']}{SUFFIX}", record)

    def get_record(self, trial_id: str) -> dict | None:
        return self._read_json(f"{self.dir}/{trial_id}{SUFFIX}")

    def records(self) -> list[dict]:
        """Every record, in trial_id order; an empty list when there are none yet."""
        selector = pafs.FileSelector(self.dir, allow_not_found=True)
        names = sorted(info.base_name for info in self.fs.get_file_info(selector)
                       if info.base_name.endswith(SUFFIX) and not info.base_name.startswith("."))
        return [self._read_json(f"{self.dir}/{name}") for name in names]
