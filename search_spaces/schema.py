"""The search-spec schema: what each section may hold, its defaults, and the checks between sections.

`validate(raw)` returns the fully defaulted spec as a plain dict or raises one SpecError
listing every problem, each as "field.path: message", so nothing reaches Ray until
the whole spec is sound. Names of models, formats, methods and hyperparameters come
from the tables in `models`, so the schema never drifts from what the code runs.

Searching: the grid is model x format x method x budget (x search.seeds). A value
written as a distribution is sampled inside each cell, `search.samples_per_cell`
times: by Tune's random sampling with `searcher: grid`, by OptunaSearch with
`searcher: optuna`. `choice` is a distribution like the others (sampled, not
expanded into the grid), so the grid axes are always the four named lists.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from ranksearch.models.rank_selection.hyperparams import METHOD_DEFAULTS, METHODS, TRAIN_DEFAULTS
from ranksearch.models.tensorized.names import FORMATS, LAYER_SHAPE_KEYS, TABLE_SHAPE_KEYS
from ranksearch.models.registry import DATASETS as DATASET_REGISTRY
from ranksearch.models.registry import REC_DATASETS
from ranksearch.models.sources import is_import_path
from ranksearch.models.zoo.names import MODELS, REC_MODELS

from .errors import Errors, join, short, suggest
from .values import Scalar, check, check_param, is_distribution

DENSE = "dense"  # the uncompressed baseline: one trial per model, formats and budgets ignored
# kind -> how it is written (the one table: models/registry.py); a ":" means it takes a location
DATASETS = {kind: DATASET_REGISTRY.forms.get(kind, kind) for kind in DATASET_REGISTRY.names()}
METRIC_MODES = {  # metric -> the mode used when an objective names none
    "accuracy": "max",
    "auc": "max",
    "logloss": "min",
    "params": "min",
    "compression": "max",
    "tensorized_params": "min",
    "wall_time_s": "min",
}
REC_ONLY_METRICS = ("auc", "logloss")  # reported by DLRM runs only
IMAGE_ONLY_METRICS = ("accuracy",)  # reported by image-model runs only
MODES = ("max", "min")
SEARCHERS = ("grid", "optuna")
SCHEDULERS = ("fifo", "asha")

SECTIONS = (
    "name", "description", "models", "dataset", "dataset_options", "model_options", "formats", "methods",
    "budgets", "train", "search", "resources", "objectives", "storage", "task", "init", "checkpoint", "shapes",
)  # fmt: skip
INITS = ("random", "pretrained")
TASK_METRIC = "task.metric"  # an objective naming the task's own metric (its metric_name and metric_mode)
SEARCH_FIELDS = {  # field -> (default, type; None allowed where the default is None)
    "searcher": ("grid", Scalar(str, choices=SEARCHERS)),
    "samples_per_cell": (1, Scalar(int, "positive")),
    "scheduler": ("fifo", Scalar(str, choices=SCHEDULERS)),
    "asha_metric": (None, Scalar(str)),  # defaults to the first objective under asha
    "max_concurrent": (None, Scalar(int, "positive")),
    "time_budget_s": (None, Scalar(float, "positive")),
    "seeds": ([0], Scalar(int, "non-negative")),  # one trial per seed in every cell
    "max_failures": (1, Scalar(int, "non-negative")),  # retries of a failing trial
}
RESOURCE_FIELDS = {  # per trial; cpu and gpu are per worker process
    "cpu": (1.0, Scalar(float, "non-negative")),
    "gpu": (0.0, Scalar(float, "non-negative")),
    "workers": (1, Scalar(int, "positive")),
}
TRAIN_BOUNDS = {
    "epochs": "positive",
    "batch_size": "positive",
    "lr": "positive",
    "max_rank": "positive",
    "momentum": "non-negative",
    "weight_decay": "non-negative",
    "finetune_epochs": "non-negative",
    "table_lr": "positive",
}
TRAIN_KEYS = tuple(k for k in TRAIN_DEFAULTS if k != "seed")  # seeds live in search.seeds
MAX_LIST = 1_000  # items in one list of the spec (seeds, models, budgets, ...)
MAX_TRIALS = 10_000  # trials one spec may expand to: beyond, a typo (samples_per_cell: 1000000000) more likely than a plan
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # it names the run directory


def validate(raw: Any, *, default_name: str = "search", source: str | None = None, user_models=(),
             user_dataset: bool = False, user_task: bool = False) -> dict:
    """The fully defaulted spec dict; raises SpecError listing every problem found.

    `models` entries and `dataset` are built-in names or import paths "pkg.module:factory";
    `user_models` are further model names (Python objects handed to run_search), `user_dataset`
    / `user_task` say a dataset / task object was handed over (the spec's entry then only labels it)."""
    errors = Errors()
    if not isinstance(raw, Mapping):
        errors.add("spec", f"expected a mapping of sections, got {type(raw).__name__}")
        errors.raise_if_any(source)
    check_keys(raw, SECTIONS, "", errors)
    models = _models(raw.get("models"), tuple(user_models), errors)
    methods = _methods(raw.get("methods"), errors)
    task = _task(raw.get("task"), user_task, errors)
    spec = {
        "name": _name(raw.get("name", default_name), errors),
        "description": _optional(raw.get("description"), Scalar(str), "description", errors),
        "models": models,
        "dataset": _dataset(raw.get("dataset"), errors, user_dataset),
        "dataset_options": _free_options(raw.get("dataset_options"), "dataset_options", DATASET_RESERVED, errors),
        "model_options": _free_options(raw.get("model_options"), "model_options", MODEL_RESERVED, errors),
        "formats": _names(raw.get("formats"), "formats", FORMATS, errors, required=_compresses(methods)),
        "methods": methods,
        "budgets": _budgets(raw.get("budgets"), errors, required=_compresses(methods)),
        "train": _train(raw.get("train"), errors),
        "search": _fields(raw.get("search"), SEARCH_FIELDS, "search", errors),
        "resources": _fields(raw.get("resources"), RESOURCE_FIELDS, "resources", errors),
        "objectives": _objectives(raw.get("objectives"), models, errors, task),
        "storage": _optional(raw.get("storage"), Scalar(str), "storage", errors),
        "task": task,
        "init": check(raw.get("init", "random"), Scalar(str, choices=INITS), "init", errors),
        "checkpoint": _checkpoint(raw.get("checkpoint"), models, errors),
        "shapes": _shapes(raw.get("shapes"), models, errors),
    }
    _check_init(spec, errors)
    _check_search(spec, errors)
    _check_size(spec, errors)
    _check_resources(spec["resources"], errors)
    _check_dataset_fits_models(spec, errors)
    errors.raise_if_any(source)
    return spec


def check_keys(mapping: Mapping, allowed, path: str, errors: Errors, what: str = "key") -> None:
    """Flags keys outside `allowed`, with a "did you mean" for near misses."""
    for key in mapping:
        if key not in allowed:
            errors.add(join(path, str(key)), f"unknown {what}; {suggest(key, allowed)}")


def _mapping(value: Any, path: str, errors: Errors) -> dict:
    """A section that may be left out or empty (YAML `train:` reads as None)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        errors.add(path, f"expected a mapping, got {short(value)}")
        return {}
    return dict(value)


def _as_list(value: Any, path: str = "", errors: Errors | None = None) -> list:
    """One or more: a lone value stands for a list of one; at most MAX_LIST items (the rest is an error)."""
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if len(items) > MAX_LIST and errors is not None:
        errors.add(path, f"{len(items):,} items; at most {MAX_LIST:,}")
        items = items[:MAX_LIST]
    return items


def _optional(value: Any, scalar: Scalar, path: str, errors: Errors) -> Any:
    return None if value is None else check(value, scalar, path, errors)


def _unique(items: list, path: str, errors: Errors) -> list:
    """Drops repeats (which would only duplicate trials), reporting each."""
    kept = []
    for i, item in enumerate(items):
        if item in kept:
            errors.add(join(path, i), f"duplicate of {join(path, items.index(item))}")
        elif item is not None:
            kept.append(item)
    return kept


def _name(value: Any, errors: Errors) -> str | None:
    if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value):
        errors.add("name", f"expected letters, digits, '_', '.' or '-' (it names the run directory), got {short(value)}")
        return None
    return value


def _names(value: Any, path: str, accepted, errors: Errors, *, required: bool) -> list:
    """A list of known names (models, formats)."""
    if value is None:
        if required:
            errors.add(path, f"required; list one or more of: {', '.join(accepted)}")
        return []
    name = Scalar(str, choices=accepted)
    return _unique([check(v, name, join(path, i), errors) for i, v in enumerate(_as_list(value, path, errors))], path, errors)


def _models(value: Any, user_models: tuple, errors: Errors) -> list:
    """Built-in names, names of models handed to run_search, or import paths 'pkg.module:factory'."""
    if value is None and user_models:
        return list(user_models)
    accepted = (*MODELS, *user_models)
    if value is None:
        errors.add("models", f"required; list one or more of: {', '.join(accepted)}, or import paths 'pkg.module:factory'")
        return []
    models = []
    for i, v in enumerate(_as_list(value)):
        if is_import_path(v) or v in user_models:
            models.append(v)
        else:
            models.append(check(v, Scalar(str, choices=accepted), join("models", i), errors))
    return _unique(models, "models", errors)


def is_user_model(model: str) -> bool:
    """A model the zoo does not build: an import path or a Python object handed to run_search."""
    return model not in MODELS


def _task(value: Any, user_task: bool, errors: Errors) -> str | None:
    if user_task:
        return value if isinstance(value, str) else "python"
    if value is not None and not is_import_path(value):
        errors.add("task", f"expected an import path 'pkg.module:Task', got {value!r}")
        return None
    return value


def _checkpoint(value: Any, models: list, errors: Errors):
    """A state_dict path for every model, or a mapping model -> path."""
    if value is None or isinstance(value, str):
        return value
    if not isinstance(value, Mapping):
        errors.add("checkpoint", f"expected a path or a mapping model -> path, got {value!r}")
        return None
    for model, path in value.items():
        if model not in models:
            errors.add(join("checkpoint", str(model)), f"not one of the spec's models ({', '.join(map(str, models))})")
        elif not isinstance(path, str):
            errors.add(join("checkpoint", str(model)), f"expected a path, got {path!r}")
    return dict(value)


SHAPE_FIELDS = LAYER_SHAPE_KEYS + TABLE_SHAPE_KEYS


def _shapes(value: Any, models: list, errors: Errors) -> dict:
    """model -> layer name -> {in_shape, out_shape} (tables: shape [rows, dims]) of lists of positive
    integers. Whether the layer exists and the factors cover its size is checked when its trial builds it."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        errors.add("shapes", f"expected a mapping model -> layer name -> {{in_shape, out_shape}}, got {value!r}")
        return {}
    for model, layers in value.items():
        where = join("shapes", str(model))
        if model not in models:
            errors.add(where, f"not one of the spec's models ({', '.join(map(str, models))})")
        elif not isinstance(layers, Mapping) or not layers:
            errors.add(where, f"expected a mapping layer name -> {{in_shape, out_shape}}, got {layers!r}")
        else:
            for layer, given in layers.items():
                _layer_shape(given, join(where, str(layer)), errors)
    return {str(model): dict(layers) for model, layers in value.items() if isinstance(layers, Mapping)}


def _layer_shape(given: Any, where: str, errors: Errors) -> None:
    if not isinstance(given, Mapping) or not given:
        errors.add(where, f"expected a mapping with {', '.join(SHAPE_FIELDS)}, got {given!r}")
        return
    check_keys(given, SHAPE_FIELDS, where, errors)
    for key, factors in given.items():
        nested = key == "shape"  # a table's [row factors, dim factors]
        lists = factors if nested and isinstance(factors, list) and len(factors) == 2 else [factors]
        if not all(isinstance(f, list) and f and all(isinstance(x, int) and not isinstance(x, bool) and x >= 1
                                                     for x in f) for f in lists):
            expected = "[[row factors], [dim factors]]" if nested else "a list of positive integers"
            errors.add(join(where, str(key)), f"expected {expected}, got {factors!r}")


def _check_init(spec: dict, errors: Errors) -> None:
    if spec["init"] == "pretrained":
        given = spec["checkpoint"]
        missing = [m for m in spec["models"] if not (isinstance(given, str) or (given and m in given))]
        if missing:
            errors.add("checkpoint", f"init: pretrained needs a trained state_dict for {', '.join(missing)} "
                                     "(checkpoint: PATH, or a mapping model -> PATH)")
    elif spec["checkpoint"] is not None:
        errors.add("checkpoint", "only used with init: pretrained")


def _dataset(value: Any, errors: Errors, user_dataset: bool = False) -> str | None:
    usages = ", ".join(DATASETS.values())
    if user_dataset:
        return value if isinstance(value, str) else "python"
    if is_import_path(value) and value.partition(":")[0] not in DATASETS:
        return value
    if not isinstance(value, str):
        errors.add("dataset", f"expected one of: {usages}, got {short(value)}")
        return None
    kind, colon, where = value.partition(":")
    if check(kind, Scalar(str, choices=tuple(DATASETS)), "dataset", errors) is None:
        return None
    takes_path = ":" in DATASETS[kind]
    if takes_path and not where:
        errors.add("dataset", f"{kind!r} needs a location: {DATASETS[kind]}")
        return None
    if colon and not takes_path:
        errors.add("dataset", f"{kind!r} takes no location, got {short(value)}")
        return None
    return value


def _free_options(value: Any, field: str, reserved: dict, errors: Errors) -> dict:
    """Free keyword arguments passed through to a builder, less the keys the search sets itself."""
    options = _mapping(value, field, errors)
    for key, where in reserved.items():
        if key in options:
            errors.add(f"{field}.{key}", where)
    return options


# dataset_options go to models.data.load_dataset (max_train, table_sizes, ...); model_options to the
# model builder (dlrm: embedding_dim, min_rows, tensorize_mlp, ...)
DATASET_RESERVED = {"seed": "set seeds with search.seeds (the data seed follows the trial's)"}
MODEL_RESERVED = {"format": "set by the grid (formats)", "max_rank": "set by train.max_rank"}


def _methods(value: Any, errors: Errors) -> dict:
    """Method -> its hyperparameters, every default filled; a list of names means all defaults."""
    if value is None or value == {} or value == []:
        errors.add("methods", f"required; name one or more of: {', '.join(METHODS)}")
        return {}
    method = Scalar(str, choices=METHODS)
    if isinstance(value, list):
        names = [check(name, method, join("methods", i), errors) for i, name in enumerate(value)]
        given = {name: None for name in names if name is not None}
    else:
        given = _mapping(value, "methods", errors)
    methods = {}
    for name, params in given.items():
        path = join("methods", str(name))
        if check(name, method, path, errors) is None:
            continue
        params = _mapping(params, path, errors)
        check_keys(params, METHOD_DEFAULTS[name], path, errors, "hyperparameter")
        methods[name] = {
            key: check_param(params[key], Scalar.like(default), join(path, key), errors) if key in params else default
            for key, default in METHOD_DEFAULTS[name].items()
        }
    return methods


def _compresses(methods: dict) -> bool:
    """Whether any method compresses, so formats and budgets are needed."""
    return any(name != DENSE for name in methods)


def _budgets(value: Any, errors: Errors, *, required: bool) -> list:
    """Fractions of the tensorized layers' dense parameter count, or {params: N} absolute counts."""
    if value is None:
        if required:
            errors.add("budgets", "required; list fractions in (0, 1] or {params: N} counts")
        return []
    return _unique([_budget(v, join("budgets", i), errors) for i, v in enumerate(_as_list(value, "budgets", errors))], "budgets", errors)


def _budget(value: Any, path: str, errors: Errors) -> float | dict | None:
    """One rule, here and on the CLI: an integer >= 2 or {params: N} is a parameter count, anything
    else a fraction in (0, 1] (so 1 is the whole dense size, 1.0 too)."""
    if isinstance(value, Mapping):
        check_keys(value, ("params",), path, errors)
        count = check(value.get("params"), Scalar(int, "positive"), join(path, "params"), errors)
        return None if count is None else {"params": count}
    if isinstance(value, int) and not isinstance(value, bool) and value >= 2:
        return {"params": value}
    fraction = Scalar(float).parse(value)
    if fraction is None:
        errors.add(path, f"expected a fraction in (0, 1], or a parameter count (an integer >= 2 or {{params: N}}), "
                         f"got {short(value)}")
    elif not 0 < fraction <= 1:
        errors.add(path, f"{value} is outside (0, 1]; an integer >= 2 or {{params: N}} is a parameter count")
        return None
    return fraction


def _train(value: Any, errors: Errors) -> dict:
    given = _mapping(value, "train", errors)
    if "seed" in given:
        errors.add("train.seed", "set seeds with search.seeds (one trial per seed)")
        given.pop("seed")
    check_keys(given, TRAIN_KEYS, "train", errors)
    return {
        key: check_param(given[key], _train_scalar(key), join("train", key), errors) if key in given else TRAIN_DEFAULTS[key]
        for key in TRAIN_KEYS
    }


def _train_scalar(key: str) -> Scalar:
    return Scalar(type(TRAIN_DEFAULTS[key]), TRAIN_BOUNDS.get(key))


def _fields(value: Any, fields: dict, path: str, errors: Errors) -> dict:
    """A section of plain settings (search, resources): each checked, defaults filled."""
    given = _mapping(value, path, errors)
    check_keys(given, fields, path, errors)
    section = {}
    for key, (default, scalar) in fields.items():
        where = join(path, key)
        if key not in given:
            section[key] = list(default) if isinstance(default, list) else default
        elif isinstance(default, list):
            items = [check(v, scalar, join(where, i), errors) for i, v in enumerate(_as_list(given[key], where, errors))]
            section[key] = _unique(items, where, errors)
            if not items:
                errors.add(where, "expected at least one value")
        else:
            section[key] = _optional(given[key], scalar, where, errors)
    return section


def _objectives(value: Any, models: list, errors: Errors, task: str | None = None) -> list:
    """[{metric, mode}, ...]; a bare metric name takes its usual mode; default quality up, params down.
    With a task, `task.metric` (the default first objective) stands for the task's own metric."""
    rec = any(m in REC_MODELS for m in models)
    if value is None:
        first = {"metric": TASK_METRIC, "mode": None} if task else {"metric": "auc" if rec else "accuracy", "mode": "max"}
        return [first, {"metric": "params", "mode": "min"}]
    if not _as_list(value):
        errors.add("objectives", "list at least one objective")
    objectives, metrics = [], []
    for i, item in enumerate(_as_list(value, "objectives", errors)):
        path = join("objectives", i)
        item = {"metric": item} if isinstance(item, str) else item
        if not isinstance(item, Mapping):
            errors.add(path, f"expected {{metric: M, mode: max|min}}, got {short(item)}")
            continue
        check_keys(item, ("metric", "mode"), path, errors)
        if task and (item.get("metric") == TASK_METRIC or (
                isinstance(item.get("metric"), str) and item["metric"] not in METRIC_MODES and item.get("mode") in MODES)):
            # the task's own metric, by its placeholder or (a saved, resolved spec) by its name and mode
            objectives.append({"metric": item["metric"], "mode": item.get("mode")})
            metrics.append(item["metric"])
            continue
        metric = check(item.get("metric"), Scalar(str, choices=(*METRIC_MODES, TASK_METRIC)), join(path, "metric"), errors)
        mode = check(item.get("mode", METRIC_MODES.get(metric, "max")), Scalar(str, choices=MODES), join(path, "mode"), errors)
        metrics.append(metric)
        if metric and mode:
            objectives.append({"metric": metric, "mode": mode})
    _unique(metrics, "objectives", errors)
    for i, metric in enumerate(metrics):
        if metric in (IMAGE_ONLY_METRICS if rec else REC_ONLY_METRICS):
            family = "DLRM runs" if rec else "image models"
            errors.add(join(join("objectives", i), "metric"), f"{metric!r} is not reported by {family}")
    return objectives


def _check_search(spec: dict, errors: Errors) -> None:
    """The ASHA metric, and that the searcher and samples_per_cell have something to sample."""
    search = spec["search"]
    metrics = [o["metric"] for o in spec["objectives"]]
    if search["scheduler"] == "asha":
        search["asha_metric"] = search["asha_metric"] or (metrics[0] if metrics else None)
        if metrics and search["asha_metric"] not in metrics:
            errors.add("search.asha_metric", f"{search['asha_metric']!r} is not an objective ({', '.join(metrics)})")
    elif search["asha_metric"] is not None:
        errors.add("search.asha_metric", "only used with scheduler: asha")
    sampled = [*spec["train"].values(), *(v for params in spec["methods"].values() for v in params.values())]
    if any(is_distribution(v) for v in sampled):
        return
    if search["searcher"] == "optuna":
        errors.add("search.searcher", "optuna needs at least one distribution to sample; use grid")
    if (search["samples_per_cell"] or 1) > 1:
        errors.add(
            "search.samples_per_cell",
            f"{search['samples_per_cell']} samples per cell but no distribution to sample; use search.seeds to repeat trials",
        )


def _check_size(spec: dict, errors: Errors) -> None:
    """How many trials the spec expands to (as plan.build_plan counts them), within MAX_TRIALS."""
    train_sampled = any(is_distribution(v) for v in spec["train"].values())
    samples, seeds = spec["search"]["samples_per_cell"] or 1, len(spec["search"]["seeds"] or [0])
    per_model = 0
    for method, params in spec["methods"].items():
        cells = 1 if method == DENSE else len(spec["formats"]) * len(spec["budgets"])
        sampled = train_sampled or any(is_distribution(v) for v in params.values())
        per_model += cells * (samples if sampled else 1)
    trials = len(spec["models"]) * per_model * seeds
    if trials > MAX_TRIALS:
        errors.add("search", f"the spec expands to {trials:,} trials (models x formats x methods x budgets x "
                             f"seeds {seeds} x samples_per_cell {samples:,}); at most {MAX_TRIALS:,} per search")


def _check_resources(resources: dict, errors: Errors) -> None:
    if resources["cpu"] == 0 and resources["gpu"] == 0:
        errors.add("resources", "a trial must ask for some cpu or gpu")


def _check_dataset_fits_models(spec: dict, errors: Errors) -> None:
    """DLRM reads Criteo-style data; the image models read everything else."""
    if spec["dataset"] is None:
        return
    kind = spec["dataset"].partition(":")[0]
    user_data = kind not in DATASETS
    for model in spec["models"]:
        if is_user_model(model) or user_data:
            if not (is_user_model(model) and user_data):
                errors.add("dataset", f"model {model!r} and dataset {spec['dataset']!r}: a model of your own needs "
                                      "a dataset factory of your own (and a built-in model a built-in dataset)")
            continue
        if (model in REC_MODELS) != (kind in REC_DATASETS):
            fits = [u for k, u in DATASETS.items() if (k in REC_DATASETS) == (model in REC_MODELS)]
            errors.add("dataset", f"{spec['dataset']!r} does not fit model {model!r}, which reads {', '.join(fits)}")
