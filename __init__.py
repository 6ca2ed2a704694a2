"""ranksearch: automatic rank selection for tensorized networks (Bayesian, L0, LWIQ), compared at scale.

The repository root is this package: `models/`, `orchestrator/` and `search_spaces/` install as
`ranksearch.models`, `ranksearch.orchestrator` and `ranksearch.search_spaces` (pyproject's
package-dir), so a user's own `models/` package is never shadowed. Names below load on first use:
`import ranksearch` stays cheap (no torch, no Ray) for the CLI and for spec validation.
"""

from importlib import import_module

_PUBLIC = {  # name -> module that defines it
    "compress": "ranksearch.models.compress",
    "CompressResult": "ranksearch.models.compress",
    "load": "ranksearch.models.checkpoint",
    "run_search": "ranksearch.orchestrator.search",
    "resume_search": "ranksearch.orchestrator.search",
    "SearchResult": "ranksearch.orchestrator.search",
    "load_spec": "ranksearch.search_spaces",
    "tensorize": "ranksearch.models.tensorized",
    "from_dense": "ranksearch.models.tensorized",
    "FactorizedLinear": "ranksearch.models.tensorized",
    "FactorizedConv2d": "ranksearch.models.tensorized",
    "FactorizedEmbedding": "ranksearch.models.tensorized",
    "FactorizedEmbeddingBag": "ranksearch.models.tensorized",
    "FactorizedTensor": "ranksearch.models.tensorized",
    "FactorizedLayer": "ranksearch.models.tensorized",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name):
    if name in _PUBLIC:
        value = getattr(import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ranksearch' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
