"""Batches from whatever a user trains on: a DataLoader, a list of (x, y), a zero-argument
callable returning a fresh iterator, or a one-shot generator.

Training needs many passes, so a one-shot iterator (a generator) is kept in memory as it is
read the first time and replayed afterwards; a re-iterable source (DataLoader, list) is
re-read every pass, so its own shuffling still happens. Tensors in a batch (tuples, lists,
dicts, or anything with `.to`, e.g. a TorchRec KJT) go to the run's device as they are read.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


def to_device(batch, device):
    """`batch` with every tensor in it (nested tuples, lists, dicts) moved to `device`."""
    if isinstance(batch, torch.Tensor) or (hasattr(batch, "to") and not isinstance(batch, type)):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        moved = [to_device(v, device) for v in batch]
        return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)
    return batch


class Batches:
    """A re-iterable view of a user's batches (see the module docstring for what it accepts)."""

    def __init__(self, source, field: str = "data"):
        self.field = field
        self._factory = self._source = self._cache = None
        if callable(source) and not hasattr(source, "__iter__"):
            self._factory = source
        elif hasattr(source, "__iter__"):
            if iter(source) is source:  # a generator / iterator: read once, then replayed
                self._cache, self._source = [], source
            else:
                self._source = source
        else:
            raise ValueError(f"{field}: expected an iterable of batches (DataLoader, list of (x, y), generator) "
                             f"or a callable returning one, got {type(source).__name__}")

    def __iter__(self):
        if self._factory is not None:
            yield from self._factory()
        elif self._cache is None:
            yield from self._source
        else:
            yield from self._cache
            if self._source is not None:  # the first pass: keep what is read
                for batch in self._source:
                    self._cache.append(batch)
                    yield batch
                self._source = None

    def first(self):
        """The first batch (for checks and shape probes); a clear error when there is none."""
        for batch in self:
            return batch
        raise ValueError(f"{self.field}: yielded no batches")


SPLITS = ("train", "val", "test")


def splits(value, field: str = "dataset") -> dict:
    """What a dataset factory returned, as {"train", "val", "test"} (test may be None):
    a (train, val, test) or (train, val) tuple, or a dict with those keys."""
    if isinstance(value, Mapping):
        missing = [k for k in ("train", "val") if k not in value]
        if missing:
            raise ValueError(f"{field}: the factory's dict has no {', '.join(missing)} (expected keys train, val, test)")
        out = {k: value.get(k) for k in SPLITS}
    elif isinstance(value, (tuple, list)) and len(value) in (2, 3):
        out = dict(zip(SPLITS, (*value, None)))
    else:
        raise ValueError(f"{field}: the factory returned {type(value).__name__}; expected (train, val, test) "
                         "iterables of batches or a dict with keys train, val, test")
    for key in SPLITS:
        if out[key] is not None:
            Batches(out[key], f"{field}.{key}")  # an iterable of batches, or a clear error
    return out
