"""Saving a compressed model so it loads with `torch.load(weights_only=True)`.

The file holds only tensors and plain containers: the model name and its
constructor arguments, each factorized layer's constructor arguments at its
pruned ranks, the state_dict and the run's metrics. Loading rebuilds the model
and swaps in factorized layers of exactly those shapes, then loads the weights.
"""

from __future__ import annotations

import os
import tempfile

import torch

from ranksearch.models.tensorized import factorized_layers
from ranksearch.models.tensorized.layers import FactorizedConv2d, FactorizedEmbedding, FactorizedEmbeddingBag, FactorizedLinear
from ranksearch.models.zoo import build_model

LAYER_CLASSES = {
    cls.kind: cls for cls in (FactorizedLinear, FactorizedConv2d, FactorizedEmbeddingBag, FactorizedEmbedding)
}
_RECORD_FIELDS = ("model", "dataset", "format", "method", "budget", "accuracy", "auc", "params", "compression", "ranks")


def save_compressed(path: str, net: torch.nn.Module, record: dict, model_kwargs: dict) -> None:
    """Write atomically: a killed writer never leaves a half file."""
    payload = {
        "model": record["model"],
        "model_kwargs": {k: list(v) if isinstance(v, tuple) else v for k, v in model_kwargs.items()},
        "layers": {name: {"kind": layer.kind, "config": _plain(layer.config())}
                   for name, layer in factorized_layers(net).items()},
        "state_dict": net.state_dict(),
        "record": {k: record.get(k) for k in _RECORD_FIELDS},
    }
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _plain(value):
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def load_compressed(path: str, map_location="cpu") -> tuple[torch.nn.Module, dict]:
    """The saved model (eval mode) and its record."""
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"model file: {path} does not exist") from None
    except Exception as exc:
        raise ValueError(f"model file: {path} is not a ranksearch model ({exc.__class__.__name__}: {exc})") from None
    kwargs = dict(payload["model_kwargs"])
    if "input_shape" in kwargs:
        kwargs["input_shape"] = tuple(kwargs["input_shape"])
    net = build_model(payload["model"], **kwargs)
    for name, spec in payload["layers"].items():
        parent_name, _, child = name.rpartition(".")
        parent = net.get_submodule(parent_name) if parent_name else net
        setattr(parent, child, LAYER_CLASSES[spec["kind"]](**spec["config"]))
    net.load_state_dict(payload["state_dict"])
    return net.eval(), payload["record"]
