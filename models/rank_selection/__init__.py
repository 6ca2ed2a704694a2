"""Rank-selection methods on one interface (see base.py): bayesian, l0, lwiq.

`fixed`, `posthoc` and `dense` are baselines handled by `models.train.fit`.
"""

from importlib import import_module

from .base import RankMethod
from .budget import BudgetError, prune_to_budget, resolve_budget, uniform_rank_for_budget
from .hyperparams import METHOD_DEFAULTS, METHODS, PRESETS, TRAIN_DEFAULTS

_CLASSES = {"bayesian": ("bayesian", "BayesianRank"), "l0": ("l0", "L0Rank"), "lwiq": ("lwiq", "LWIQRank")}
SEARCH_METHODS = tuple(_CLASSES)


def make_method(name: str, **hyperparameters) -> RankMethod:
    """A method by name with its defaults (hyperparams.METHOD_DEFAULTS) overridden."""
    if name not in _CLASSES:
        raise ValueError(f"method: {name!r} is not a rank-selection method; expected one of {', '.join(_CLASSES)}")
    unknown = set(hyperparameters) - set(METHOD_DEFAULTS[name])
    if unknown:
        raise ValueError(f"{name}: unknown hyperparameter(s) {sorted(unknown)}; known: {sorted(METHOD_DEFAULTS[name])}")
    module, cls = _CLASSES[name]
    return getattr(import_module(f".{module}", __name__), cls)(**resolve_preset(name, hyperparameters))


def resolve_preset(name: str, hyperparameters: dict) -> dict:
    """All hyperparameters of `name`: defaults, then the named `preset`'s values for those left at
    their default (a spec fills in every default, so only a different value counts as set), then
    the values given."""
    defaults = METHOD_DEFAULTS[name]
    preset = hyperparameters.get("preset", defaults.get("preset", "default"))
    if preset != "default" and preset not in PRESETS.get(name, {}):
        known = ", ".join(["default", *PRESETS.get(name, {})])
        raise ValueError(f"{name}.preset: unknown preset {preset!r}; expected one of {known}")
    given = {k: v for k, v in hyperparameters.items() if k not in defaults or v != defaults[k]}
    return {**defaults, **PRESETS.get(name, {}).get(preset, {}), **given, **({"preset": preset} if "preset" in defaults else {})}


__all__ = ["BudgetError", "METHODS", "METHOD_DEFAULTS", "RankMethod", "SEARCH_METHODS", "TRAIN_DEFAULTS",
           "make_method", "prune_to_budget", "resolve_preset", "resolve_budget", "uniform_rank_for_budget"]
