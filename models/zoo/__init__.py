"""Models by name (models/registry.py): `build_model(name, input_shape=..., num_classes=...)`."""

from __future__ import annotations

from ranksearch.models.registry import MODELS as _REGISTRY

from .image import MLP, CifarResNet, LeNet5
from .names import IMAGE_MODELS, MODELS, REC_MODELS


def build_model(name: str, *, input_shape=None, num_classes=None, **kwargs):
    """A zoo model; DLRM builders take no input_shape/num_classes (their data sets the tables)."""
    factory = _REGISTRY.resolve(name, "model")
    if name in REC_MODELS:
        return factory(**kwargs)
    return factory(input_shape, num_classes, **kwargs)


__all__ = ["IMAGE_MODELS", "MODELS", "REC_MODELS", "CifarResNet", "LeNet5", "MLP", "build_model"]
