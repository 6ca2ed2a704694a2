"""What a validated spec expands to: the trial slots of the grid and the Tune search domains.

A slot is one point of model x format x method x budget x seed x sample. Its `key`
is built from those values only, so it is the same in every run of the spec: it is
the trial_id in the reports and the name of the trial's record, which is how a
resumed search recognizes work that already finished (see trainable.py).

Both searchers see the same trial config, {"slot": i, "train": {...}, "<method>": {...}},
holding only the values drawn from distributions; fixed values come from the plan.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ranksearch.search_spaces import Spec, SpecError, is_distribution

TRIAL_LOG_ENV = "RANKSEARCH_TRIAL_LOG"
DRIVER_CPU = 0.01  # a multi-worker trial's own CPU (Tune needs some): it only waits on its workers
# Objective -> the per-epoch value `fit` reports for it (ASHA needs one every epoch).
EPOCH_METRICS = {"accuracy": "val_accuracy", "auc": "val_auc", "logloss": "val_logloss", "params": "params"}


@dataclass(frozen=True)
class Slot:
    index: int
    key: str
    cell: dict  # {model, format, method, budget} as in Spec.cells()
    cell_index: int
    seed: int
    sample: int


@dataclass(frozen=True)
class Plan:
    """Everything a trial needs besides its sampled values; picklable, shipped to every trial."""

    spec: dict  # Spec.to_dict()
    slots: tuple[Slot, ...]
    experiment_path: str  # local absolute path or URI; records live under it
    trial_log: str | None = None  # RANKSEARCH_TRIAL_LOG of the driver (see trainable.py)
    code: dict | None = None  # usercode.UserCode fields (plain data): where user code resolves; None: none used

    @property
    def report_epochs(self) -> bool:
        """Whether Tune needs each epoch's row: only ASHA reads them (each report is a round trip)."""
        return self.spec["search"]["scheduler"] == "asha"

    @property
    def worker_cpus(self) -> float:
        """CPUs per Ray Train worker of a multi-worker trial: the spec's cpu less a share of the
        driver's, so driver + workers ask for exactly workers x cpu, what the resource check allowed."""
        resources = self.spec["resources"]
        return max(0.0, resources["cpu"] - DRIVER_CPU / resources["workers"])

    @property
    def train_fixed(self) -> dict:
        return {k: v for k, v in self.spec["train"].items() if not is_distribution(v)}

    def method_fixed(self, method: str) -> dict:
        return {k: v for k, v in self.spec["methods"][method].items() if not is_distribution(v)}

    def space(self, method: str) -> dict:
        """Tune domains of the values sampled for `method`'s cells (train and method sections)."""
        sections = {"train": self.spec["train"], method: self.spec["methods"][method]}
        space = {name: {k: tune_domain(v) for k, v in values.items() if is_distribution(v)}
                 for name, values in sections.items()}
        return {name: domains for name, domains in space.items() if domains}

    def full_space(self) -> dict:
        """Domains of every method at once: `searcher: grid` samples them all, each trial reads its own."""
        space = {}
        for method in self.spec["methods"]:
            space.update(self.space(method))
        return space

    def hyperparameters(self, slot: Slot, config: dict) -> tuple[dict, dict]:
        """(train settings, method hyperparameters) of one trial: fixed values + sampled ones."""
        method = slot.cell["method"]
        train = {**self.train_fixed, **config.get("train", {}), "seed": slot.seed}
        return train, {**self.method_fixed(method), **config.get(method, {})}

    def base_record(self, slot: Slot, config: dict) -> dict:
        """What a record says about a trial before `fit` adds results: enough for a failed or stopped one."""
        cell = slot.cell
        train, method_params = self.hyperparameters(slot, config)
        absolute = isinstance(cell["budget"], dict)  # then `budget` (a fraction) is None and budget_params is set
        return {
            "trial_id": slot.key, "model": cell["model"], "dataset": self.spec["dataset"], "format": cell["format"],
            "method": cell["method"], "budget": None if absolute else cell["budget"],
            "budget_params": fit_budget(cell["budget"]) if absolute else None,
            "seed": slot.seed, "sample": slot.sample, "config": {**train, **method_params},
        }


def build_plan(spec: Spec, experiment_path: str, code=None) -> Plan:
    """Slots ordered sample-major, so Optuna sees finished samples of a cell before it draws the next."""
    spec_dict = spec.to_dict()
    check_asha_metric(spec_dict)
    samples = spec.search["samples_per_cell"] or 1
    cells = spec.cells()
    slots = []
    for sample in range(samples):
        for seed in spec.search["seeds"]:
            for c, cell in enumerate(cells):
                if sample and not _samples_anything(spec_dict, cell["method"]):
                    continue  # nothing to draw: another sample would repeat the same trial
                slots.append(Slot(len(slots), trial_key(cell, seed, sample), cell, c, seed, sample))
    return Plan(spec_dict, tuple(slots), experiment_path, os.environ.get(TRIAL_LOG_ENV), code)


def _samples_anything(spec: dict, method: str) -> bool:
    values = [*spec["train"].values(), *spec["methods"][method].values()]
    return any(is_distribution(v) for v in values)


def trial_key(cell: dict, seed: int, sample: int) -> str:
    """e.g. 'mlp-tt-l0-b0.1-s0-n0'; 'mlp-dense-s0-n0'; absolute budgets read 'p12000'."""
    parts = [cell["model"].replace(":", ".")]  # an import path names a file: no ':' in it
    if cell["method"] == "dense":
        parts.append("dense")
    else:
        budget = cell["budget"]
        parts += [cell["format"], cell["method"], f"p{budget['params']}" if isinstance(budget, dict) else f"b{budget:g}"]
    return "-".join([*parts, f"s{seed}", f"n{sample}"])


def fit_budget(budget):
    """The spec's budget in `fit`'s terms: a fraction stays a float, {params: N} becomes the int N."""
    return budget["params"] if isinstance(budget, dict) else budget


def tune_domain(dist: dict):
    """A spec distribution as a Tune domain (OptunaSearch converts these to Optuna's); int bounds inclusive."""
    from ray import tune

    ((kind, args),) = dist.items()
    if kind == "loguniform":
        return tune.loguniform(*args)
    if kind == "uniform":
        return tune.uniform(*args)
    if kind == "int":
        return tune.randint(args[0], args[1] + 1)
    return tune.choice(list(args))


def check_asha_metric(spec: dict) -> None:
    """ASHA compares trials every epoch, so its metric must be one `fit` reports per epoch."""
    search = spec["search"]
    if search["scheduler"] == "asha" and search["asha_metric"] not in EPOCH_METRICS:
        raise SpecError([
            f"search.asha_metric: {search['asha_metric']!r} is only known when a trial ends; "
            f"ASHA needs a per-epoch metric: {', '.join(EPOCH_METRICS)}"
        ])
