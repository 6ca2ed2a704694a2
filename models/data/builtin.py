"""The built-in data sets as loaders of one shape, `loader(location, *, seed, max_train, max_test,
**options)`, so `load_dataset` dispatches through the registry (models/registry.py)."""

from __future__ import annotations

from .images import load_cifar10, load_digits, load_mnist


def forwards_to(target: str):
    """Mark a wrapper with the "module:function" whose keyword options it passes on, so the
    preflight checks a spec's dataset_options against that signature (no second table)."""
    def mark(fn):
        fn.options_of = target
        return fn
    return mark


@forwards_to("ranksearch.models.data.images:load_digits")
def digits(location, *, seed, max_train, max_test, **options):
    return load_digits(seed=seed, max_train=max_train, max_test=max_test, **options)


@forwards_to("ranksearch.models.data.bundled:load_mnist14")
def mnist14(location, *, seed, max_train, max_test, **options):
    from .bundled import load_mnist14

    return load_mnist14(seed=seed, max_train=max_train, max_test=max_test, **options)


@forwards_to("ranksearch.models.data.images:load_mnist")
def mnist(location, *, seed, max_train, max_test, **options):
    return load_mnist(location, seed=seed, max_train=max_train, max_test=max_test, **options)


@forwards_to("ranksearch.models.data.images:load_cifar10")
def cifar10(location, *, seed, max_train, max_test, **options):
    return load_cifar10(location, seed=seed, max_train=max_train, max_test=max_test, **options)


@forwards_to("ranksearch.models.data.criteo:load_criteo")
def criteo(location, *, seed, max_train, max_test, **options):
    from .criteo import load_criteo

    return load_criteo(location, **options).subsample(max_train, max_test, seed)


@forwards_to("ranksearch.models.data.synthetic:synthetic_criteo")
def synthetic(location, *, seed, max_train, max_test, **options):
    from .synthetic import synthetic_criteo

    return synthetic_criteo(seed=seed, **options).subsample(max_train, max_test, seed)
