"""Checks a spec passes before anything trains, beyond its schema: what `validate` promises.

The schema (search_spaces) is torch-free and checks names and types. These look at the code
and the machine: dataset and model options the loader or builder would reject with a
TypeError in every trial, a dataset location that is not there, and resources the machine
(or, given an address, the cluster) cannot give. run_search runs them too, before Ray starts.
"""

from __future__ import annotations

import inspect
import os
from importlib import import_module
from pathlib import Path

from ranksearch.models.registry import DATASETS, MODELS
from ranksearch.search_spaces import SpecError
from ranksearch.search_spaces.errors import Errors, suggest

LOAD_DATASET_OPTIONS = {"max_train", "max_test"}  # models.data.load_dataset itself applies these
SET_BY_TASK = {"input_shape", "num_classes", "table_sizes", "num_dense"}  # a model's builder gets these from the data


def _keywords(fn) -> set[str] | None:
    """Keyword parameters of `fn` (None when it takes **kwargs: anything may be right)."""
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


def _options_source(obj):
    """What `obj` passes its keyword options to (`options_of`, a callable or "module:attr"), or obj."""
    target = getattr(obj, "options_of", obj)
    if isinstance(target, str):
        module, _, attribute = target.partition(":")
        target = getattr(import_module(module), attribute)
    return target


def dataset_option_names(dataset: str) -> set[str] | None:
    kind = dataset.partition(":")[0]
    if kind not in DATASETS:
        return None  # an import path (the user's own loader) or unknown: the schema speaks for it
    accepted = _keywords(_options_source(DATASETS.resolve(kind)))
    return None if accepted is None else (accepted - {"seed", "root", "path"}) | LOAD_DATASET_OPTIONS


def model_option_names(model: str) -> set[str] | None:
    if model not in MODELS:
        return None
    accepted = _keywords(_options_source(MODELS.resolve(model)))
    return None if accepted is None else accepted - SET_BY_TASK - {"depth", "self"}


def check_options(dataset: str, models: list, dataset_options: dict, model_options: dict, errors: Errors) -> None:
    accepted = dataset_option_names(dataset)
    if accepted is not None:
        for key in dataset_options:
            if key not in accepted:
                errors.add(f"dataset_options.{key}", f"not an option of {dataset.partition(':')[0]!r}; "
                                                     f"{suggest(key, sorted(accepted))}")
    for model in models:
        accepted = model_option_names(model)
        if accepted is None:
            continue
        for key in model_options:
            if key not in accepted:
                errors.add(f"model_options.{key}", f"not an option of model {model!r}; {suggest(key, sorted(accepted))}")


def check_dataset_location(dataset: str, errors: Errors) -> None:
    """mnist:DIR, cifar10:DIR, criteo:PATH must exist where the search starts (local runs, validate)."""
    kind, _, where = dataset.partition(":")
    if where and not Path(where).expanduser().exists() and kind in DATASETS:
        errors.add("dataset", f"{where!r} does not exist (relative paths are from {os.getcwd()})")


def preflight(spec, *, local: bool = True) -> None:
    """SpecError listing what the trials would fail on; `local`: the data is read on this machine."""
    errors = Errors()
    check_options(spec.dataset, spec.models, spec.dataset_options, spec.model_options, errors)
    if local:
        check_dataset_location(spec.dataset, errors)
    errors.raise_if_any(spec.name)


def check_machine(spec, address: str | None) -> None:
    """Resources of one trial against this machine, or with `address` against that cluster."""
    if not address:
        from .connect import _local_gpus

        spec.check_resources({"CPU": os.cpu_count() or 1, "GPU": _local_gpus()})
        return
    import ray

    from .connect import connect

    if connect(spec, address):  # checks against the cluster's capacity
        ray.shutdown()


__all__ = ["preflight", "check_machine", "SpecError"]
