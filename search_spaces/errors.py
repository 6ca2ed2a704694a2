"""SpecError and the collector that lets validation report every problem at once.

Users fix specs faster when they see all mistakes in one run, so validators append
"field.path: message" lines to an `Errors` list instead of raising at the first one.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


MAX_LINE = 300  # characters of one error line: values are echoed, and a value can be huge
MAX_SHOWN = 50  # error lines listed; the rest are counted


def short(value: object, limit: int = 80) -> str:
    """repr(value), cut to `limit` characters with the full length said: an echo, not a dump."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def _cut(line: str) -> str:
    return line if len(line) <= MAX_LINE else f"{line[:MAX_LINE]}... (cut at {MAX_LINE} characters)"


class SpecError(ValueError):
    """An invalid search spec; `errors` holds one "field.path: message" line per problem."""

    def __init__(self, errors: list[str], source: str | None = None, total: int | None = None):
        self.errors = [_cut(e) for e in errors[:MAX_SHOWN]]
        self.total = max(total or 0, len(errors))
        self.source = source
        where = f" {source}" if source else ""
        plural = "s" if self.total != 1 else ""
        lines = "\n".join(f"  {e}" for e in self.errors)
        more = f"\n  ... and {self.total - len(self.errors)} more" if self.total > len(self.errors) else ""
        super().__init__(f"invalid search spec{where} ({self.total} error{plural}):\n{lines}{more}")


class Errors(list):
    """A list of "path: message" lines (the first MAX_SHOWN kept, the rest counted);
    `raise_if_any` turns them into one SpecError."""

    dropped = 0

    def add(self, path: str, message: str) -> None:
        if len(self) >= MAX_SHOWN:
            self.dropped += 1
            return
        self.append(_cut(f"{path}: {message}" if path else message))

    def raise_if_any(self, source: str | None = None) -> None:
        if self:
            raise SpecError(self, source, len(self) + self.dropped)


def join(path: str, key: str | int) -> str:
    """Child path: join("train", "lr") -> "train.lr", join("budgets", 2) -> "budgets[2]"."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def closest(word: object, choices: Iterable[str]) -> str | None:
    """The accepted value nearest to a misspelt `word`, if any is near."""
    close = difflib.get_close_matches(str(word)[:100], list(choices), n=1, cutoff=0.6)
    return close[0] if close else None


def suggest(word: object, choices: Iterable[str]) -> str:
    """The accepted values, led by "did you mean 'x'?" when one is close to `word`."""
    choices = list(choices)
    if not choices:
        return "none are accepted here"
    accepted = "accepted: " + ", ".join(choices)
    near = closest(word, choices)
    return f"did you mean {near!r}? ({accepted})" if near else accepted
