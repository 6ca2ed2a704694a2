"""What a trial record must look like to be believed: the check every record passes on read.

Records live in the experiment folder, which may be shared storage others can write, and a
killed writer or a full disk can leave anything there. A record is plain JSON, never code;
this check decides whether it is used (report, resume) or set aside as unreadable. It looks
at the fields the reports, the fronts and resume read, not at everything a record holds.
"""

from __future__ import annotations

import math
from numbers import Real

STATUSES = ("ok", "failed", "stopped")
MAX_RECORD_BYTES = 16 * 2**20  # a record is a few kB; a file larger than this is not ours


def _text(v) -> bool:
    return isinstance(v, str)


def _number(v) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool) and (math.isfinite(v) or math.isnan(v))


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63  # int64 in the Parquet reports


def _rows(v) -> bool:
    return isinstance(v, list) and all(isinstance(row, dict) for row in v)


def _mapping(v) -> bool:
    return isinstance(v, dict)


def _ranks(v) -> bool:
    return isinstance(v, dict) and all(isinstance(r, list) and all(_count(x) for x in r) for r in v.values())


# field -> (check, what it must be); None is allowed for every field but the required ones.
FIELDS = {
    "trial_id": (_text, "a string"), "status": (lambda v: v in STATUSES, f"one of {', '.join(STATUSES)}"),
    "model": (_text, "a string"), "method": (_text, "a string"), "dataset": (_text, "a string"),
    "format": (_text, "a string"), "error": (_text, "a string"),
    "budget": (_number, "a number"), "budget_params": (_count, "a non-negative integer"),
    "seed": (_count, "a non-negative integer"), "sample": (_count, "a non-negative integer"),
    "accuracy": (_number, "a number"), "auc": (_number, "a number"), "logloss": (_number, "a number"),
    "params": (_count, "a non-negative integer"), "dense_params": (_count, "a non-negative integer"),
    "tensorized_params": (_count, "a non-negative integer"),
    "tensorized_dense_params": (_count, "a non-negative integer"),
    "compression": (_number, "a number"), "epochs_done": (_count, "a non-negative integer"),
    "wall_time_s": (_number, "a number"), "rank_search_time_s": (_number, "a number"),
    "config": (_mapping, "a mapping"), "history": (_rows, "a list of mappings"),
    "layers": (_rows, "a list of mappings"), "ranks": (_ranks, "a mapping of layer -> list of ranks"),
}
REQUIRED = ("trial_id", "status", "model", "method")


def record_problem(record, trial_id: str) -> str | None:
    """Why `record`, read from the file of `trial_id`, cannot be used; None when it can."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    for key in REQUIRED:
        if record.get(key) is None:
            return f"{key}: missing"
    for key, (ok, what) in FIELDS.items():
        value = record.get(key)
        if value is not None and not ok(value):
            return f"{key}: expected {what}, got {_short(value)}"
    big = _oversized_int(record)
    if big is not None:
        return f"{big}: an integer beyond 64 bits"
    if record["trial_id"] != trial_id:
        return f"trial_id: {_short(record['trial_id'])} does not match its file name ({trial_id})"
    return None


def _oversized_int(record: dict) -> str | None:
    """The key of the first integer anywhere in the record that int64 (Parquet) cannot hold."""
    stack = [(key, value) for key, value in record.items()]
    while stack:
        key, value = stack.pop()
        if isinstance(value, int) and not -(2**63) <= value < 2**63:
            return str(key)[:60]
        if isinstance(value, dict):
            stack.extend((key, v) for v in value.values())
        elif isinstance(value, list):
            stack.extend((key, v) for v in value)
    return None


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
