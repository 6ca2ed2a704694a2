"""User code in a search: model factories, a dataset factory and a task, named by import path in
the spec or handed to run_search as Python objects.

`resolve_user_code` runs in the driver (and in `ranksearch validate`) before Ray starts: every
import path is imported, every factory called once with its options and its result checked, so
a missing module, a factory that raises or one returning the wrong thing is a SpecError naming
the field. Python objects travel to the trials cloudpickled by value (their modules registered
with cloudpickle), and trials put the driver's project directory first on sys.path before
resolving anything, so the user's own packages (a `models/` of their own included) import on
every worker.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from ranksearch.models.sources import add_project_dir, resolve
from ranksearch.search_spaces import SpecError
from ranksearch.search_spaces.schema import TASK_METRIC, is_user_model


@dataclass(frozen=True)
class UserCode:
    project_dir: str
    objects: bytes | None = None  # cloudpickled {"models": {label: factory}, "dataset": f, "task": t}

    def as_plan(self) -> dict:
        """Plain data for the trial plan (the trials rebuild a UserCode from it)."""
        return dataclasses.asdict(self)

    def used_by(self, spec) -> bool:
        return bool(self.objects) or spec.task is not None or any(is_user_model(m) for m in spec.models) \
            or spec.init == "pretrained"

    def _objects(self) -> dict:
        if not self.objects:
            return {}
        import cloudpickle

        add_project_dir(self.project_dir)
        return cloudpickle.loads(self.objects)

    def model_factory(self, label: str, field: str = "models"):
        factory = self._objects().get("models", {}).get(label)
        return factory if factory is not None else resolve(label, field, self.project_dir)

    def dataset_factory(self, dataset: str):
        given = self._objects().get("dataset")
        return given if given is not None else resolve(dataset, "dataset", self.project_dir)

    def task(self, task: str | None):
        if task is None:
            return None
        given = self._objects().get("task")
        return given if given is not None else resolve(task, "task", self.project_dir)

    def path(self, path: str) -> str:
        """A path from the spec (checkpoint) relative to the project directory."""
        return path if os.path.isabs(path) else os.path.join(self.project_dir, path)


def pack_objects(models=None, dataset=None, task=None) -> bytes | None:
    """Python objects handed to run_search, pickled by value so workers need not import their modules."""
    objects = {k: v for k, v in {"models": models or None, "dataset": dataset, "task": task}.items() if v is not None}
    if not objects:
        return None
    import sys

    import cloudpickle

    for obj in [*(models or {}).values(), dataset, task]:
        module = sys.modules.get(getattr(obj, "__module__", None) or "")
        if module is not None and module.__name__ != "__main__" and not module.__name__.startswith(("ranksearch", "torch")):
            cloudpickle.register_pickle_by_value(module)
    return cloudpickle.dumps(objects)


def resolve_user_code(spec, code: UserCode, *, call: bool = True):
    """Check every piece of user code the spec names (SpecError naming the field) and return the
    spec with `task.metric` objectives replaced by the task's metric name and mode."""
    import torch.nn as nn

    from ranksearch.models.data.loaders import splits
    from ranksearch.models.tasks import task_options

    errors = []
    user_models = [(i, m) for i, m in enumerate(spec.models) if is_user_model(m)]
    for i, label in user_models:
        field = f"models[{i}]"
        try:
            factory = code.model_factory(label, field)
            if not callable(factory):
                raise ValueError(f"{field}: {label!r} is not callable")
            if call:
                net = factory(**spec.model_options)
                if not isinstance(net, nn.Module):
                    raise ValueError(f"{field}: {label!r} returned {type(net).__name__}, not a torch.nn.Module")
        except ValueError as exc:
            errors.append(str(exc) if str(exc).startswith(("models", "dataset", "task")) else f"{field}: {exc}")
        except Exception as exc:
            errors.append(f"{field}: {label!r} raised {type(exc).__name__}: {exc}")
    try:
        factory = code.dataset_factory(spec.dataset) if user_models else None
        if call and factory is not None:
            try:
                data = factory(**spec.dataset_options)
            except Exception as exc:
                raise ValueError(f"dataset: {spec.dataset!r} raised {type(exc).__name__}: {exc}") from None
            splits(data, "dataset")
    except ValueError as exc:
        errors.append(str(exc))
    objectives = spec.objectives
    try:
        task = code.task(spec.task)
        if task is not None:
            options = task_options(task)
            objectives = [{"metric": options["metric_name"], "mode": o["mode"] or options["metric_mode"]}
                          if o["metric"] == TASK_METRIC else o for o in objectives]
    except ValueError as exc:
        errors.append(str(exc) if str(exc).startswith("task") else f"task: {exc}")
    if spec.init == "pretrained":
        for label in spec.models:
            path = spec.checkpoint if isinstance(spec.checkpoint, str) else spec.checkpoint[label]
            if not os.path.isfile(code.path(path)):
                errors.append(f"checkpoint: {path} (for {label}) does not exist")
    if errors:
        raise SpecError(errors, spec.name)
    return dataclasses.replace(spec, objectives=objectives)
