"""Rank-selection methods on one interface (see base.py): bayesian, l0, lwiq.

`fixed`, `posthoc` and `dense` are baselines handled by `models.train.fit`.
"""

from importlib import import_module

from .base import RankMethod
from .budget import BudgetError, prune_to_budget, resolve_budget, uniform_rank_for_budget
from .hyperparams import METHOD_DEFAULTS, METHODS, TRAIN_DEFAULTS

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
    return getattr(import_module(f".{module}", __name__), cls)(**{**METHOD_DEFAULTS[name], **hyperparameters})


__all__ = ["BudgetError", "METHODS", "METHOD_DEFAULTS", "RankMethod", "SEARCH_METHODS", "TRAIN_DEFAULTS",
           "make_method", "prune_to_budget", "resolve_budget", "uniform_rank_for_budget"]
