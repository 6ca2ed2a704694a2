"""Durable trial records: one JSON file per finished trial, `<experiment>/records/<trial_id>.json`.

They are the source of truth for the reports (`ranksearch report DIR` rebuilds from them
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


class RecordStore:
    def __init__(self, experiment_path: str):
        if is_uri(experiment_path):
            self.fs, root = pafs.FileSystem.from_uri(str(experiment_path))
        else:
            self.fs, root = pafs.LocalFileSystem(), str(experiment_path)
        self.dir = f"{root.rstrip('/')}/records"

    def _path(self, trial_id: str) -> str:
        return f"{self.dir}/{trial_id}{SUFFIX}"

    def write(self, record: dict) -> None:
        self.fs.create_dir(self.dir, recursive=True)
        tmp = f"{self.dir}/.{record['trial_id']}.{uuid.uuid4().hex}.tmp"
        with self.fs.open_output_stream(tmp) as out:
            out.write(json.dumps(record, default=str).encode())
        self.fs.move(tmp, self._path(record["trial_id"]))

    def get(self, trial_id: str) -> dict | None:
        try:
            with self.fs.open_input_stream(self._path(trial_id)) as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None

    def all(self) -> list[dict]:
        """Every record, in trial_id order; an empty list when there are none yet."""
        selector = pafs.FileSelector(self.dir, allow_not_found=True)
        names = sorted(info.base_name for info in self.fs.get_file_info(selector)
                       if info.base_name.endswith(SUFFIX) and not info.base_name.startswith("."))
        records = []
        for name in names:
            with self.fs.open_input_stream(f"{self.dir}/{name}") as f:
                records.append(json.loads(f.read()))
        return records
