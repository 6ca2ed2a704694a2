"""Single values in a spec: typed scalars and the distributions a search may sample.

A hyperparameter is either a plain value (fixed) or a one-key dict naming a
distribution: {loguniform: [lo, hi]}, {uniform: [lo, hi]}, {int: [lo, hi]} or
{choice: [a, b, ...]}. Bounds and options are checked like fixed values, so
`lr: {uniform: [-1, 1]}` fails as "train.lr.uniform[0]: expected a positive number".
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import Errors, closest, join, short, suggest

DISTRIBUTIONS = ("loguniform", "uniform", "int", "choice")
_NOUNS = {int: "integer", float: "number", str: "string"}


def is_distribution(value: Any) -> bool:
    """True for a distribution dict such as {"loguniform": [1e-5, 1e-3]}, False for a fixed value."""
    return isinstance(value, Mapping) and len(value) == 1 and next(iter(value)) in DISTRIBUTIONS


@dataclass(frozen=True)
class Scalar:
    """What a fixed value must be: a type (int, float, bool, str), a bound for numbers, or a closed set."""

    kind: type
    bound: str | None = None  # None | "positive" | "non-negative"
    choices: tuple | None = None

    def describe(self) -> str:
        if self.choices is not None:
            return "one of: " + ", ".join(map(str, self.choices))
        if self.kind is bool:
            return "true or false"
        words = [self.bound, _NOUNS[self.kind]] if self.bound else [_NOUNS[self.kind]]
        article = "an" if words[0][0] in "aeiou" else "a"
        return " ".join([article, *words])

    @classmethod
    def like(cls, default: Any) -> Scalar:
        """The scalar type of a default value (a float default accepts ints too)."""
        return cls(type(default))

    def parse(self, value: Any) -> Any:
        """The value in canonical form (ints widened to float for float fields), or None if invalid."""
        if isinstance(value, bool) or self.kind is bool:
            return value if isinstance(value, bool) and self.kind is bool else None
        if self.choices is not None:
            return value if value in self.choices else None
        if self.kind is str:
            return value if isinstance(value, str) and value.strip() else None
        if self.kind is int and not isinstance(value, int):
            return None
        if self.kind is float:
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                return None
            value = float(value)
        if (self.bound == "positive" and value <= 0) or (self.bound == "non-negative" and value < 0):
            return None
        return value


def check(value: Any, scalar: Scalar, path: str, errors: Errors) -> Any:
    """A fixed value; records "path: expected ..., got ..." and returns None when invalid."""
    parsed = scalar.parse(value)
    if parsed is None:
        near = closest(value, scalar.choices) if scalar.choices and isinstance(value, str) else None
        hint = f"; did you mean {near!r}?" if near else ""
        errors.add(path, f"expected {scalar.describe()}, got {short(value)}{hint}")
    return parsed


def check_param(value: Any, scalar: Scalar, path: str, errors: Errors) -> Any:
    """A hyperparameter: a fixed value or a distribution over such values."""
    if isinstance(value, Mapping):
        return _check_distribution(value, scalar, path, errors)
    return check(value, scalar, path, errors)


def _check_distribution(value: Mapping, scalar: Scalar, path: str, errors: Errors) -> Any:
    if len(value) != 1:
        errors.add(path, f"a distribution has exactly one key ({', '.join(DISTRIBUTIONS)}), got {sorted(value)}")
        return None
    ((kind, args),) = value.items()
    if kind not in DISTRIBUTIONS:
        errors.add(path, f"unknown distribution {short(kind)}; {suggest(kind, DISTRIBUTIONS)}")
        return None
    where = join(path, kind)
    if kind == "choice":
        if not isinstance(args, list) or not args:
            errors.add(where, f"expected a non-empty list of options, got {short(args)}")
            return None
        return {kind: [check(option, scalar, join(where, i), errors) for i, option in enumerate(args)]}
    needed = int if kind == "int" else float
    if scalar.kind is not needed:
        hint = {int: "{int: [lo, hi]}", float: "{uniform: [lo, hi]} or {loguniform: [lo, hi]}"}.get(scalar.kind)
        ways = f"{hint} or {{choice: [...]}}" if hint else "{choice: [...]}"
        errors.add(path, f"{kind!r} does not fit a field that expects {scalar.describe()}; search it with {ways}")
        return None
    if not isinstance(args, list) or len(args) != 2:
        errors.add(where, f"expected [lo, hi], got {short(args)}")
        return None
    lo, hi = (check(bound, scalar, join(where, i), errors) for i, bound in enumerate(args))
    if lo is None or hi is None:
        return None
    if lo >= hi:
        errors.add(where, f"lo must be below hi, got [{lo}, {hi}]")
    elif kind == "loguniform" and lo <= 0:
        errors.add(where, f"loguniform needs lo > 0, got lo={lo}")
    return {kind: [lo, hi]}
