"""`report/index.html` while a search runs: a Tune callback rewrites it after every trial.

The page (html_report.py) holds every planned trial: the finished ones from their records
(the same rows the final report has), the ones Tune runs now as `running`, the rest as
`pending`. It is written when the search starts, when a trial starts and after each trial
ends; the final report (report.write_reports) then replaces it with the same page, frozen.

A local experiment's page is written to a temporary name and renamed over the old one, so a
browser never loads half a page; on an object store (s3://, gs://) each upload replaces the
object whole. Records are read once per trial and cached on the driver, so a rewrite costs
the rendering only (~30 ms for 200 trials).
"""

from __future__ import annotations

import logging
import os
import secrets
import time

from ray import tune

from .progress import trial_status
from .records import ExperimentFiles, error_line, is_uri

PAGE = "report/index.html"
START_EVERY_S = 1.0  # trial starts come in bursts: at most one rewrite per second for them

log = logging.getLogger(__name__)


class LiveReport(tune.Callback):
    """`slots`: (trial_id, model, method, format, budget, budget_params) of every planned trial, in plan
    order (a trial's config["slot"] indexes it). Tune pickles callbacks with its experiment state:
    only these plain settings travel, the record cache is rebuilt from storage."""

    def __init__(self, experiment_path: str, title: str, slots: list[tuple], objectives: list[dict]):
        self.experiment_path, self.title, self.slots, self.objectives = experiment_path, title, slots, objectives
        self._records, self._last = None, 0.0

    def __getstate__(self):
        return {**self.__dict__, "_records": None}

    def setup(self, **info):
        self._load()
        self.write({})

    def on_trial_start(self, iteration, trials, trial, **info):
        if time.monotonic() - self._last >= START_EVERY_S:
            self.write(self._running(trials))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._ended(trials, trial, "complete")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._ended(trials, trial, "error")

    def _ended(self, trials, trial, ending: str) -> None:
        key = self.slots[trial.config["slot"]][0]
        record = ExperimentFiles(self.experiment_path).get_record(key)
        if record is None:  # no record (yet): what collect_records will write for it
            status = trial_status(trial, ending)
            record = self._row(trial.config["slot"], status or "failed")
            record["error"] = error_line(trial.get_error()) if status == "failed" else None
        self._load()[key] = record
        self.write(self._running(trials, ended=trial))

    def _load(self) -> dict:
        if self._records is None:
            self._records = {r["trial_id"]: r for r in ExperimentFiles(self.experiment_path).records()
                             if isinstance(r, dict) and r.get("trial_id")}
        return self._records

    def _running(self, trials, ended=None) -> set:
        return {self.slots[t.config["slot"]][0] for t in trials
                if t is not ended and t.status == "RUNNING" and "slot" in t.config}

    def _row(self, index: int, status: str) -> dict:
        trial_id, model, method, fmt, budget, budget_params = self.slots[index]
        return {"trial_id": trial_id, "status": status, "model": model, "method": method, "format": fmt,
                "budget": budget, "budget_params": budget_params}

    def write(self, running: set) -> None:
        """Render and replace the page; a failure to write it is logged, never fails the search."""
        from .report import render_page

        records = self._load()
        unfinished = [self._row(i, "running" if slot[0] in running else "pending")
                      for i, slot in enumerate(self.slots) if slot[0] not in records]
        try:
            page = render_page([r for r in records.values() if r.get("status") in ("ok", "failed", "stopped")],
                               title=self.title, objectives=self.objectives, unfinished=unfinished)
            write_text(self.experiment_path, PAGE, page)
        except Exception as exc:  # the page is a view: the search and its records matter more
            log.warning("live report %s/%s not written: %s", self.experiment_path, PAGE, exc)
        self._last = time.monotonic()


def write_text(experiment_path: str, relative: str, text: str) -> None:
    """Replace `<experiment_path>/<relative>` whole: tmp + rename locally, one upload on an object store."""
    data = text.encode("utf-8")
    if is_uri(experiment_path):
        import pyarrow.fs as pafs

        fs, root = pafs.FileSystem.from_uri(experiment_path)
        with fs.open_output_stream(f"{root.rstrip('/')}/{relative}") as out:
            out.write(data)
        return
    path = os.path.join(experiment_path, relative)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def slot_rows(plan) -> list[tuple]:
    """LiveReport's `slots` from a Plan."""
    rows = []
    for slot in plan.slots:
        cell, absolute = slot.cell, isinstance(slot.cell["budget"], dict)
        budget = None if cell["method"] == "dense" or absolute else cell["budget"]
        rows.append((slot.key, cell["model"], cell["method"], None if cell["method"] == "dense" else cell["format"],
                     budget, cell["budget"]["params"] if absolute else None))
    return rows
