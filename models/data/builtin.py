"""The built-in data sets as loaders of one shape, `loader(location, *, seed, max_train, max_test,
**options)`, so `load_dataset` dispatches through the registry (models/registry.py)."""

from __future__ import annotations

from .images import load_cifar10, load_digits, load_mnist


def digits(location, *, seed, max_train, max_test, **options):
    return load_digits(seed=seed, max_train=max_train, max_test=max_test, **options)


def mnist14(location, *, seed, max_train, max_test, **options):
    from .bundled import load_mnist14

    return load_mnist14(seed=seed, max_train=max_train, max_test=max_test, **options)


def mnist(location, *, seed, max_train, max_test, **options):
    return load_mnist(location, seed=seed, max_train=max_train, max_test=max_test, **options)


def cifar10(location, *, seed, max_train, max_test, **options):
    return load_cifar10(location, seed=seed, max_train=max_train, max_test=max_test, **options)


def criteo(location, *, seed, max_train, max_test, **options):
    from .criteo import load_criteo

    return load_criteo(location, **options).subsample(max_train, max_test, seed)


def synthetic(location, *, seed, max_train, max_test, **options):
    from .synthetic import synthetic_criteo

    return synthetic_criteo(seed=seed, **options).subsample(max_train, max_test, seed)
