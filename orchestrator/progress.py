"""Live progress of a search: one line per finished trial.

The line: trials done / running / failed / stopped, and the best value of the first
objective per method. The same numbers as Ray metrics come from metrics.py.
Everything is recomputed from Tune's trial list at each event, so a resumed search
shows the trials of earlier sessions too.
"""

from __future__ import annotations

import sys
from collections import Counter

from ray import tune

from .records import error_line

BOUNDED = ("accuracy", "auc")  # in [0, 1], maximized: hypervolume reference 0


def trial_status(trial, ending: str | None = None) -> str | None:
    """ok | failed | stopped for a finished Tune trial, None while it runs. Callbacks run before
    Tune updates trial.status, so they pass `ending` ("complete" or "error") for the trial at hand."""
    if ending == "error" or trial.status == "ERROR":
        return "failed"
    if ending != "complete" and trial.status != "TERMINATED":
        return None
    result = trial.last_result or {}
    return result["status"] if result.get("done_record") else "stopped"


def budget_label(result: dict) -> str:
    """A finished trial's budget as a metric tag: '0.1', 'p12000' (absolute) or 'dense'."""
    if result.get("method") == "dense":
        return "dense"
    if result.get("budget") is not None:
        return f"{result['budget']:g}"
    return f"p{result.get('budget_params')}"


class SearchProgress(tune.Callback):
    """Tune pickles its callbacks with the experiment (for resume): hence no stream kept,
    only plain settings."""

    def __init__(self, search: str, methods: tuple[str, ...], objectives: list[dict]):
        self.search, self.methods, self.total = search, methods, len(methods)  # methods: one per plan slot
        self.metric, self.mode = objectives[0]["metric"], objectives[0]["mode"]

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._finished(trials, trial, "complete")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._finished(trials, trial, "error")

    def _finished(self, trials, trial, ending: str) -> None:
        """`finished`: (method, last result, status) of every trial that has ended, this one included."""
        finished = [(self.methods[t.config["slot"]], t.last_result or {}, status) for t in trials
                    if (status := trial_status(t, ending if t is trial else None))]
        counts = Counter(status for _, _, status in finished)
        running = sum(t.status == "RUNNING" and t is not trial for t in trials)
        self._print(trial, trial_status(trial, ending), len(finished), running, counts, self._best(finished))

    def _best(self, finished: list) -> dict:
        """Best value of the first objective per method, over finished trials."""
        pick = max if self.mode == "max" else min
        best = {}
        for method, r, status in finished:
            if status == "ok" and r.get(self.metric) is not None:
                best[method] = pick(best.get(method, r[self.metric]), r[self.metric])
        return best

    def _print(self, trial, status: str, done: int, running: int, counts: Counter, best: dict) -> None:
        r = trial.last_result or {}
        name = str(trial)  # the slot key (search.py names trials by it)
        if status == "ok":
            outcome = f"{self.metric} {_num(r.get(self.metric))}  params {r.get('params') or 0:,}"
        elif status == "failed":
            outcome = r.get("error") if r.get("done_record") else error_line(trial.get_error())
        else:
            outcome = f"stopped by the scheduler after {r.get('epoch', 0)} epoch(s)"
        board = ", ".join(f"{m} {_num(v)}" for m, v in sorted(best.items()))
        print(f"[{done:>{len(str(self.total))}}/{self.total}] {status:<7} {name}  {outcome}  | running {running}, "
              f"failed {counts['failed']}, stopped {counts['stopped']}"
              f"{'  | best ' + self.metric + ': ' + board if board else ''}", file=sys.stdout, flush=True)


def _num(v) -> str:
    return "-" if v is None else f"{v:.4f}"
