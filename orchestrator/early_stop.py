"""`scheduler: asha`: asynchronous successive halving with one bracket per grid cell.

Ray's ASHAScheduler over the whole grid ranked an L0 trial in its gate search against a
Bayesian trial in its KL warm-up and a `fixed` trial that never searches, and on the
per-epoch metric of models not yet pruned to their budget (larger, so not comparable):
7 of 8 trials of a two-method search were stopped and one method vanished from every front.
So here:

- Trials are compared only with trials of the same cell (model, format, method, budget).
- Only epochs at the budget count: rows of the `train` and `finetune` phases, after the
  method has pruned (a `fixed` or `dense` trial is at its size from the start). The rung
  of a row is how many such rows the trial has reported: 1, rf, rf^2, ...
- A trial is stopped at a rung when its metric is below the (1 - 1/rf) quantile of what
  the cell's trials reached there before it (ASHA's rule). The best so far at a rung is
  never below that quantile, so every cell keeps at least one trial running to the end;
  a trial's last epoch is never a stop.
- The driver keeps each trial's rows, so a stopped trial's record has its history, the
  metric at the stop and `epochs_done` (search.py writes it).
- On resume the rungs are seeded from the records' histories: new trials are compared with
  what finished before the interruption, as if the search had not stopped.
"""

from __future__ import annotations

import math

from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from .plan import Plan, Slot

AT_BUDGET = ("train", "finetune")  # phases whose model has its final (budget) size
WORST = -1e300  # a NaN metric ranks below everything (finite, so quantiles stay numbers)
ROW_KEYS = ("epoch", "phase", "loss", "params", "epoch_time_s")


def epoch_row(result: dict) -> dict | None:
    """The trainer's per-epoch row inside a Tune result, or None for other results (the summary)."""
    if "phase" not in result or "epoch" not in result:
        return None
    return {k: v for k, v in result.items() if k in ROW_KEYS or k.startswith("val_")}


def at_budget_values(rows: list[dict], metric: str) -> list[float]:
    """The metric of each at-budget row, in order: index n-1 is rung position n."""
    return [row[metric] for row in rows if row.get("phase") in AT_BUDGET and isinstance(row.get(metric), (int, float))]


class CellASHA(FIFOScheduler):
    def __init__(self, plan: Plan, metric: str, mode: str, done: list[dict] = (), reduction_factor: int = 4):
        super().__init__()
        self._plan, self._metric, self._sign, self._rf = plan, metric, 1.0 if mode == "max" else -1.0, reduction_factor
        self._rungs: dict[int, dict[int, dict[str, float]]] = {}  # cell -> rung -> {trial key: signed value}
        self.history: dict[str, list[dict]] = {}  # trial key -> its rows (this session)
        self.stopped: set[str] = set()  # trial keys this scheduler stopped
        cells = {slot.key: slot.cell_index for slot in plan.slots}
        for record in done:
            if record.get("trial_id") in cells:
                self._seed(cells[record["trial_id"]], record)

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return True  # its metric is its own (the per-epoch one), whatever the searcher optimizes

    def _seed(self, cell: int, record: dict) -> None:
        values = at_budget_values(record.get("history") or [], self._metric)
        for n, value in enumerate(values[:-1], start=1):  # the last row is the end, never a rung
            if self._is_rung(n):
                self._rungs.setdefault(cell, {}).setdefault(n, {})[record["trial_id"]] = self._signed(value)

    def _is_rung(self, n: int) -> bool:
        while n > 1 and n % self._rf == 0:
            n //= self._rf
        return n == 1

    def _signed(self, value) -> float:
        return WORST if value is None or math.isnan(value) else self._sign * float(value)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        row = epoch_row(result)
        if row is None:
            return TrialScheduler.CONTINUE
        slot = self._plan.slots[trial.config["slot"]]
        rows = self.history.setdefault(slot.key, [])
        rows.append(row)
        if row["phase"] not in AT_BUDGET or self._metric not in row or self._last_epoch(slot, trial.config, row):
            return TrialScheduler.CONTINUE
        n = len(at_budget_values(rows, self._metric))
        if not self._is_rung(n):
            return TrialScheduler.CONTINUE
        rung = self._rungs.setdefault(slot.cell_index, {}).setdefault(n, {})
        value = self._signed(row[self._metric])
        before = [v for key, v in rung.items() if key != slot.key]
        rung[slot.key] = value
        if before and value < _quantile(before, 1 - 1 / self._rf):
            self.stopped.add(slot.key)
            return TrialScheduler.STOP
        return TrialScheduler.CONTINUE

    def _last_epoch(self, slot: Slot, config: dict, row: dict) -> bool:
        train, _ = self._plan.hyperparameters(slot, config)
        return row["epoch"] >= train["epochs"] + train["finetune_epochs"]

    def debug_string(self) -> str:
        return f"CellASHA: {len(self._rungs)} cells, {len(self.stopped)} stopped"


def _quantile(values: list[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default), without numpy for a handful of values."""
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    if ordered[lo] == ordered[hi] or lo == hi:
        return ordered[lo]
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)
