"""Model names the CLI, specs and `build_model` accept (from the one registry, models/registry.py)."""

from ranksearch.models.registry import MODELS as _REGISTRY
from ranksearch.models.registry import REC_MODELS

MODELS = _REGISTRY.names()
IMAGE_MODELS = tuple(m for m in MODELS if m not in REC_MODELS)
