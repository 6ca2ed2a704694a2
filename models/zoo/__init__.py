"""Models by name: `build_model(name, input_shape=..., num_classes=...)`."""

from __future__ import annotations

from .image import MLP, CifarResNet, LeNet5
from .names import IMAGE_MODELS, MODELS, REC_MODELS


def build_model(name: str, *, input_shape=None, num_classes=None, **kwargs):
    if name == "mlp":
        return MLP(input_shape, num_classes, **kwargs)
    if name == "lenet5":
        return LeNet5(input_shape, num_classes, **kwargs)
    if name.startswith("resnet") and name in IMAGE_MODELS:
        return CifarResNet(int(name[len("resnet"):]), input_shape, num_classes, **kwargs)
    if name == "dlrm":
        from .dlrm import build_dlrm

        return build_dlrm(**kwargs)
    raise ValueError(f"model: unknown model {name!r}; expected one of {', '.join(MODELS)}")


__all__ = ["IMAGE_MODELS", "MODELS", "REC_MODELS", "build_model"]
