"""`searcher: optuna`: one Optuna study per grid cell, behind one Tune Searcher.

OptunaSearch rejects `tune.grid_search`, and the grid (model x format x method x
budget x seed) must be covered exactly, not sampled. Two alternatives were weighed:
a Tuner per cell runs cells one after another (or juggles many Tuners), with one
experiment directory, scheduler and resume state per cell; one study with the cell as
a categorical samples cells unevenly and mixes unrelated problems (each method has its
own hyperparameters, and the best L0 lambda at budget 0.05 says little about 0.2).
So this Searcher walks the slots still to run in order and asks the study of each slot's
cell for that cell's sampled values: one Tuner, one experiment, one scheduler; every cell
covered; each study models exactly its own problem on the spec's objectives.

- A trial the scheduler stopped is told to its study as PRUNED, with the per-epoch metric
  it reached at its budget as intermediate values (Optuna's `report` refuses those for
  multi-objective studies, so they go to the study's storage directly), so the sampler
  learns from it.
- On resume a study is rebuilt from the records (never from a pickle): every finished,
  stopped or failed trial of the cell is added to it before it samples again.
- `samples_per_cell` counts trials per cell, whatever stops: the slots are the plan's.
"""

from __future__ import annotations

import math

import optuna
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from .early_stop import at_budget_values, epoch_row
from .plan import Plan


class CellSearch(Searcher):
    def __init__(self, plan: Plan, metric: list[str], mode: list[str], seed: int = 0, *,
                 todo: tuple[int, ...] | None = None, done: list[dict] = (), epoch_metric: str | None = None):
        super().__init__(metric=metric, mode=mode)
        self._plan, self._seed, self._epoch_metric = plan, seed, epoch_metric
        self._todo = list(range(len(plan.slots)) if todo is None else todo)
        self._next = 0  # the next of _todo to hand out
        self._studies: dict[int, OptunaSearch] = {}  # cell index -> its study
        self._cell_of: dict[str, int | None] = {}  # trial id -> cell index (None: nothing sampled)
        self._rows: dict[str, list[dict]] = {}  # trial id -> its per-epoch rows
        cell_of_key = {slot.key: slot.cell_index for slot in plan.slots}
        self._done: dict[int, list[dict]] = {}
        for record in done:
            if record.get("trial_id") in cell_of_key:
                self._done.setdefault(cell_of_key[record["trial_id"]], []).append(record)

    def suggest(self, trial_id: str):
        if self._next >= len(self._todo):
            return Searcher.FINISHED
        slot = self._plan.slots[self._todo[self._next]]
        self._next += 1
        cell = slot.cell_index
        space = self._plan.space(slot.cell["method"])
        if not space:  # nothing to sample in this cell: the grid point alone
            self._cell_of[trial_id] = None
            return {"slot": slot.index}
        if cell not in self._studies:
            optuna.logging.set_verbosity(optuna.logging.WARNING)  # not a line per study on the terminal
            study = OptunaSearch(OptunaSearch.convert_search_space(space), metric=self.metric, mode=self.mode,
                                 seed=self._seed + cell)
            for record in self._done.get(cell, []):
                self._add_record(study, record)
            self._studies[cell] = study
        self._cell_of[trial_id] = cell
        return {"slot": slot.index, **self._studies[cell].suggest(trial_id)}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        row = epoch_row(result)
        if row is not None and self._cell_of.get(trial_id) is not None:
            self._rows.setdefault(trial_id, []).append(row)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        cell = self._cell_of.pop(trial_id, None)
        rows = self._rows.pop(trial_id, [])
        if cell is None:
            return
        study = self._studies[cell]
        status = (result or {}).get("status") if (result or {}).get("done_record") else None
        if error or status == "failed":
            study.on_trial_complete(trial_id, None, error=True)
        elif status in ("ok", "stopped"):
            study.on_trial_complete(trial_id, result if status == "ok" else None)
        else:  # stopped early by the scheduler: Optuna's "pruned", with what it reached
            ot_trial = study._ot_trials.get(trial_id)
            if ot_trial is not None:
                self._set_intermediate(study, ot_trial._trial_id, rows)
            study.on_trial_complete(trial_id, None)

    def _intermediate(self, rows: list[dict]) -> dict[int, float]:
        if not self._epoch_metric:
            return {}
        values = at_budget_values(rows, self._epoch_metric)
        return {step: float(v) for step, v in enumerate(values, start=1) if math.isfinite(v)}

    def _set_intermediate(self, study: OptunaSearch, storage_trial_id: int, rows: list[dict]) -> None:
        storage = study._ot_study._storage
        for step, value in self._intermediate(rows).items():
            storage.set_trial_intermediate_value(storage_trial_id, step, value)

    def _add_record(self, study: OptunaSearch, record: dict) -> None:
        """One earlier trial of this cell, from its record, as a finished trial of the study."""
        config, distributions = record.get("config") or {}, study._space
        params = {name: config.get(name.rpartition("/")[2]) for name in distributions}
        status = record.get("status")
        values = [record.get(m) for m in self.metric]
        if status == "ok" and all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            state, values = optuna.trial.TrialState.COMPLETE, [float(v) for v in values]
        elif status == "stopped":
            state, values = optuna.trial.TrialState.PRUNED, None
        else:
            state, values = optuna.trial.TrialState.FAIL, None
        try:
            trial = optuna.trial.create_trial(
                state=state, values=values, params=params, distributions=distributions,
                intermediate_values=self._intermediate(record.get("history") or []) or None)
            study._ot_study.add_trial(trial)
        except (ValueError, TypeError):
            pass  # values outside this spec's space (an edited spec or record): the study learns without it

    def save(self, checkpoint_path: str):
        """Nothing is saved: resume rebuilds the studies from the records (see module doc)."""

    def restore(self, checkpoint_path: str):
        raise RuntimeError("ranksearch never restores a searcher from a file; resume rebuilds it from the records")
