"""SpecError and the collector that lets validation report every problem at once.

Users fix specs faster when they see all mistakes in one run, so validators append
"field.path: message" lines to an `Errors` list instead of raising at the first one.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class SpecError(ValueError):
    """An invalid search spec; `errors` holds one "field.path: message" line per problem."""

    def __init__(self, errors: list[str], source: str | None = None):
        self.errors = list(errors)
        self.source = source
        where = f" {source}" if source else ""
        plural = "s" if len(self.errors) != 1 else ""
        lines = "\n".join(f"  {e}" for e in self.errors)
        super().__init__(f"invalid search spec{where} ({len(self.errors)} error{plural}):\n{lines}")


class Errors(list):
    """A list of "path: message" lines; `raise_if_any` turns them into one SpecError."""

    def add(self, path: str, message: str) -> None:
        self.append(f"{path}: {message}" if path else message)

    def raise_if_any(self, source: str | None = None) -> None:
        if self:
            raise SpecError(self, source)


def join(path: str, key: str | int) -> str:
    """Child path: join("train", "lr") -> "train.lr", join("budgets", 2) -> "budgets[2]"."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def closest(word: object, choices: Iterable[str]) -> str | None:
    """The accepted value nearest to a misspelt `word`, if any is near."""
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return close[0] if close else None


def suggest(word: object, choices: Iterable[str]) -> str:
    """The accepted values, led by "did you mean 'x'?" when one is close to `word`."""
    choices = list(choices)
    if not choices:
        return "none are accepted here"
    accepted = "accepted: " + ", ".join(choices)
    near = closest(word, choices)
    return f"did you mean {near!r}? ({accepted})" if near else accepted
