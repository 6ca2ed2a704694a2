"""Data sets by spec string: `digits` (default, bundled), `mnist14` (bundled 14x14 MNIST subset), `mnist:DIR`, `cifar10:DIR`,
`criteo:FILE_OR_DIR`, `synthetic-criteo`.

The Criteo side needs torchrec (seconds to import), so it is loaded only when asked for:
`from models.data import RecData` still works.
"""

from __future__ import annotations

from .common import DatasetError
from .images import ClassificationData, load_cifar10, load_digits, load_mnist

DATASETS = ("digits", "mnist14", "mnist", "cifar10", "criteo", "synthetic-criteo")
_NEEDS_PATH = {"mnist": "DIR", "cifar10": "DIR", "criteo": "FILE_OR_DIR"}
_ACCEPTED = "digits, mnist14, mnist:DIR, cifar10:DIR, criteo:FILE_OR_DIR, synthetic-criteo"
_LAZY = {
    "RecData": "criteo", "RecBatch": "criteo", "iter_criteo_batches": "criteo", "load_criteo": "criteo",
    "KAGGLE_TABLE_SIZES": "criteo", "NUM_DENSE": "criteo", "NUM_SPARSE": "criteo",
    "synthetic_criteo": "synthetic", "SYNTHETIC_TABLE_SIZES": "synthetic",
}

__all__ = ["DATASETS", "DatasetError", "ClassificationData", "load_dataset", "load_digits", "load_mnist",
           "load_cifar10", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_dataset(spec: str, *, seed: int = 0, max_train: int | None = None, max_test: int | None = None, **kw):
    """ClassificationData or RecData for `spec`; `kw` goes to the Criteo loaders (table_sizes, num_samples, ...).

    max_train / max_test keep a seeded random subset of each split.
    """
    kind, has_arg, arg = str(spec).partition(":")
    if kind not in DATASETS:
        raise DatasetError(f"unknown dataset {spec!r}; accepted: {_ACCEPTED}")
    if (kind in _NEEDS_PATH) != bool(has_arg and arg):
        form = f"{kind}:{_NEEDS_PATH[kind]}" if kind in _NEEDS_PATH else kind
        raise DatasetError(f"dataset {spec!r}: expected the form {form}; accepted: {_ACCEPTED}")
    limits = dict(seed=seed, max_train=max_train, max_test=max_test)
    if kind == "digits":
        return load_digits(**limits, **kw)
    if kind == "mnist14":
        from .bundled import load_mnist14

        return load_mnist14(**limits, **kw)
    if kind == "mnist":
        return load_mnist(arg, **limits, **kw)
    if kind == "cifar10":
        return load_cifar10(arg, **limits, **kw)
    if kind == "criteo":
        from .criteo import load_criteo

        data = load_criteo(arg, **kw)
    else:
        from .synthetic import synthetic_criteo

        data = synthetic_criteo(seed=seed, **kw)
    return data.subsample(max_train, max_test, seed)
