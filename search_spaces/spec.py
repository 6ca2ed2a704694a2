"""Spec: a validated search spec, and the views of it the orchestrator needs."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

from .errors import Errors
from .schema import DENSE


@dataclass(frozen=True)
class Spec:
    """A validated, fully defaulted search spec; build it with `load_spec`.

    Fields are the spec's sections (see schema.SECTIONS); hyperparameter values are
    plain values or distribution dicts (see values.is_distribution).
    """

    name: str
    description: str | None
    models: list
    dataset: str
    dataset_options: dict
    model_options: dict
    formats: list
    methods: dict
    budgets: list
    train: dict
    search: dict
    resources: dict
    objectives: list
    storage: str | None
    task: str | None = None  # import path of the task (loss, metric, step), or "python"
    init: str = "random"  # random | pretrained (every trial starts from `checkpoint`)
    checkpoint: str | dict | None = None
    shapes: dict = dataclasses.field(default_factory=dict)  # model -> layer name -> {in_shape, out_shape}

    def to_dict(self) -> dict:
        """A deep plain copy (JSON-serializable) that load_spec accepts back unchanged."""
        return dataclasses.asdict(self)

    def cells(self) -> list[dict]:
        """The grid: {model, format, method, budget} per cell; budget as in the spec (a float
        fraction or {"params": N}). `dense` has one cell per model, format and budget None.
        Seeds and samples_per_cell multiply each cell into trials."""
        cells = []
        for model in self.models:
            for method in self.methods:
                if method == DENSE:
                    cells.append({"model": model, "format": None, "method": method, "budget": None})
                    continue
                for fmt in self.formats:
                    for budget in self.budgets:
                        cells.append({"model": model, "format": fmt, "method": method, "budget": copy.deepcopy(budget)})
        return cells

    def method_params(self, method: str) -> dict:
        """That method's hyperparameters, defaults filled; values may be distribution dicts."""
        if method not in self.methods:
            raise KeyError(f"method {method!r} is not in spec {self.name!r} (it has: {', '.join(self.methods)})")
        return copy.deepcopy(self.methods[method])

    def check_resources(self, cluster_resources: dict) -> None:
        """Raises SpecError when one trial asks for more CPU or GPU than the cluster has in all
        (e.g. ray.cluster_resources()): Ray Tune would otherwise leave it pending forever.
        On an autoscaling cluster pass what it can grow to, not what is up now."""
        errors = Errors()
        workers = self.resources["workers"]
        for field, key in (("cpu", "CPU"), ("gpu", "GPU")):
            per_worker = self.resources[field]
            need, have = per_worker * workers, float(cluster_resources.get(key, 0.0))
            if need > have:
                errors.add(
                    f"resources.{field}",
                    f"a trial needs {need:g} {key} ({field} {per_worker:g} x workers {workers}) "
                    f"but the cluster offers {have:g}; Ray Tune would wait forever",
                )
        errors.raise_if_any(self.name)
