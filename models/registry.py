"""Registries of the extension points a user names in a spec: models and datasets. (The other
two are registries of their own: formats in models/tensorized (names.py, build_tensor), methods
in models/strategies.py, where every method, the baselines included, registers its strategy.)

Each maps a name to "module:attribute" (so reading the names imports no torch: the spec schema
and the CLI list them) or, for names a user registers at run time, to the object itself. A
user's import path "pkg.module:factory" resolves through the same `resolve`, so a model of
one's own needs no table edit and no `if name == ...` branch anywhere.
"""

from __future__ import annotations

from importlib import import_module

from .sources import is_import_path, resolve as resolve_import_path


class Registry:
    def __init__(self, kind: str, entries: dict, forms: dict | None = None):
        self.kind, self._entries = kind, dict(entries)
        self.forms = dict(forms or {})  # name -> how it is written (e.g. "mnist:DIR"), for help and errors

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def __contains__(self, name) -> bool:
        return name in self._entries

    def usage(self) -> str:
        """The accepted spellings, for help texts and error messages."""
        return ", ".join(self.forms.get(n, n) for n in self._entries)

    def register(self, name: str, target) -> None:
        """Add `name` -> an object or an import path (a user's own model, dataset, ...)."""
        self._entries[name] = target

    def resolve(self, name: str, field: str | None = None):
        """The object registered as `name`, or the one an import path names."""
        field = field or self.kind
        if name in self._entries:
            target = self._entries[name]
            if not isinstance(target, str):
                return target
            module, _, attribute = target.partition(":")
            return getattr(import_module(module), attribute)
        if is_import_path(name):
            return resolve_import_path(name, field)
        raise ValueError(f"{field}: unknown {self.kind} {name!r}; expected one of {self.usage()} or an import "
                         "path 'package.module:factory'")


MODELS = Registry("model", {
    "mlp": "ranksearch.models.zoo.image:MLP",
    "lenet5": "ranksearch.models.zoo.image:LeNet5",
    "resnet20": "ranksearch.models.zoo.image:resnet20",
    "resnet32": "ranksearch.models.zoo.image:resnet32",
    "resnet56": "ranksearch.models.zoo.image:resnet56",
    "dlrm": "ranksearch.models.zoo.dlrm:build_dlrm",
})
REC_MODELS = ("dlrm",)

# name -> loader(location, *, seed, max_train, max_test, **options); forms say which take a location
DATASETS = Registry("dataset", {
    "digits": "ranksearch.models.data.builtin:digits",
    "mnist14": "ranksearch.models.data.builtin:mnist14",
    "mnist": "ranksearch.models.data.builtin:mnist",
    "cifar10": "ranksearch.models.data.builtin:cifar10",
    "criteo": "ranksearch.models.data.builtin:criteo",
    "synthetic-criteo": "ranksearch.models.data.builtin:synthetic",
}, forms={"mnist": "mnist:DIR", "cifar10": "cifar10:DIR", "criteo": "criteo:FILE_OR_DIR"})
REC_DATASETS = ("criteo", "synthetic-criteo")
