"""`searcher: optuna`: one Optuna study per grid cell, behind one Tune Searcher.

OptunaSearch rejects `tune.grid_search`, and the grid (model x format x method x
budget x seed) must be covered exactly, not sampled. Two alternatives were weighed:
a Tuner per cell runs cells one after another (or juggles many Tuners), with one
experiment directory, scheduler and resume state per cell; one study with the cell as
a categorical samples cells unevenly and mixes unrelated problems (each method has its
own hyperparameters, and the best L0 lambda at budget 0.05 says little about 0.2).
So this Searcher walks the plan's slots in order and asks the study of each slot's cell
for that cell's sampled values: one Tuner, one experiment, one ASHA, one resume; every
cell covered; each study models exactly its own problem on the spec's objectives.
(After a resume, a slot handed out again whose record exists reports that record:
its study is then told the old result for the new draw, a small blur accepted for
never training a finished trial twice.)
"""

from __future__ import annotations

import pickle

import optuna
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from .plan import Plan


class CellSearch(Searcher):
    def __init__(self, plan: Plan, metric: list[str], mode: list[str], seed: int = 0):
        super().__init__(metric=metric, mode=mode)
        self._plan, self._seed = plan, seed
        self._next = 0  # the next slot to hand out
        self._studies: dict[int, OptunaSearch] = {}  # cell index -> its study
        self._cell_of: dict[str, int | None] = {}  # trial id -> cell index (None: nothing sampled)

    def suggest(self, trial_id: str):
        if self._next >= len(self._plan.slots):
            return Searcher.FINISHED
        slot = self._plan.slots[self._next]
        self._next += 1
        cell = slot.cell_index
        space = self._plan.space(slot.cell["method"])
        if not space:  # nothing to sample in this cell: the grid point alone
            self._cell_of[trial_id] = None
            return {"slot": slot.index}
        if cell not in self._studies:
            optuna.logging.set_verbosity(optuna.logging.WARNING)  # not a line per study on the terminal
            space = OptunaSearch.convert_search_space(space)
            self._studies[cell] = OptunaSearch(space, metric=self.metric, mode=self.mode, seed=self._seed + cell)
        self._cell_of[trial_id] = cell
        return {"slot": slot.index, **self._studies[cell].suggest(trial_id)}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        cell = self._cell_of.pop(trial_id, None)
        if cell is None:
            return
        status = (result or {}).get("status")
        if error or status == "failed":
            self._studies[cell].on_trial_complete(trial_id, None, error=True)
        elif status == "ok":
            self._studies[cell].on_trial_complete(trial_id, result)
        else:  # stopped early by the scheduler: Optuna's "pruned"
            self._studies[cell].on_trial_complete(trial_id, None)

    def save(self, checkpoint_path: str):
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str):
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))
