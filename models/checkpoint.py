"""Saving a compressed model so it loads with `torch.load(weights_only=True)`.

The file holds only tensors and plain containers: where the model comes from (`source`: a zoo
name and its constructor arguments, a user factory's import path and options, or a user
module's class), each factorized layer's constructor arguments at its pruned ranks, the
state_dict and the run's metrics. Loading rebuilds the model, swaps in factorized layers of
exactly those shapes, then loads the weights. Code named in a file is never imported: a user
model is rebuilt from the `model=` the caller passes (an instance, a factory, an import path).
"""

from __future__ import annotations

import os
import tempfile

import torch
from torch import nn

from ranksearch.models.tensorized import factorized_layers
from ranksearch.models.tensorized.layers import FactorizedConv2d, FactorizedEmbedding, FactorizedEmbeddingBag, FactorizedLinear

LAYER_CLASSES = {
    cls.kind: cls for cls in (FactorizedLinear, FactorizedConv2d, FactorizedEmbeddingBag, FactorizedEmbedding)
}
_RECORD_FIELDS = ("model", "dataset", "format", "method", "budget", "accuracy", "auc", "params", "compression", "ranks",
                  "metric", "init", "dense_metric", "trial_id")


def _plain(value):
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def layer_specs(net: nn.Module) -> dict:
    """{layer name: {kind, config}} for every factorized layer: what rebuilds it at its ranks."""
    return {name: {"kind": layer.kind, "config": _plain(layer.config())} for name, layer in factorized_layers(net).items()}


def save_compressed(path: str, net: nn.Module, record: dict, model_kwargs: dict, source: dict | None = None) -> None:
    """Write atomically: a killed writer never leaves a half file. `source` says how the model
    is rebuilt: {"kind": "zoo", "name"} (default: record["model"]), {"kind": "import", "path"},
    or {"kind": "module", "class"} (informative; the loader passes the model)."""
    record_fields = {k: record.get(k) for k in _RECORD_FIELDS}
    payload = {
        "source": _plain(source or {"kind": "zoo", "name": record["model"]}),
        "model": record["model"],
        "model_kwargs": _plain(dict(model_kwargs)),
        "layers": layer_specs(net),
        "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "record": _plain(record_fields),
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


def _payload_problem(payload: dict) -> str | None:
    """What a safe but foreign file lacks: the fields load_compressed reads, with their types."""
    for key in ("layers", "state_dict", "model_kwargs"):
        if not isinstance(payload[key], dict):
            return f"{key} is {type(payload[key]).__name__}, not a mapping"
    if not isinstance(payload.get("record", {}), dict):
        return "record is not a mapping"
    source = payload.get("source")
    if source is None and not isinstance(payload.get("model"), str):
        return "it names no model"
    if source is not None and (not isinstance(source, dict) or "kind" not in source or
                               (source["kind"] == "zoo" and not isinstance(source.get("name"), str))):
        return "its model source is not one ranksearch writes"
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in payload["state_dict"].items()):
        return "state_dict does not map names to tensors"
    return None


def read_payload(path: str, map_location="cpu") -> dict:
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"model file: {path} does not exist") from None
    except Exception as exc:
        raise ValueError(f"model file: {path} is not a ranksearch model ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(payload, dict) or not {"layers", "state_dict", "model_kwargs"} <= set(payload):
        raise ValueError(f"model file: {path} is not a ranksearch model (missing layers/state_dict)")
    problem = _payload_problem(payload)
    if problem:
        raise ValueError(f"model file: {path} is not a ranksearch model ({problem})")
    for name, spec in payload["layers"].items():
        if not isinstance(spec, dict) or spec.get("kind") not in LAYER_CLASSES or not isinstance(spec.get("config"), dict):
            raise ValueError(f"model file: {path}: layer {name!r} has no known factorized kind")
    return payload


def _rebuild(payload: dict, model, path: str) -> nn.Module:
    from ranksearch.models.zoo import build_model

    source = payload.get("source") or {"kind": "zoo", "name": payload["model"]}
    kwargs = dict(payload["model_kwargs"])
    if model is None:
        if source["kind"] != "zoo":
            where = source.get("path") or source.get("class")
            raise ValueError(f"model: {path} holds a user model ({where}, options {kwargs}); pass model= a fresh "
                             "instance, a factory or its import path: ranksearch never imports code a file names")
        if "input_shape" in kwargs:
            kwargs["input_shape"] = tuple(kwargs["input_shape"])
        return build_model(source["name"], **kwargs)
    if isinstance(model, nn.Module):
        return model
    if isinstance(model, str):
        from ranksearch.models.sources import resolve

        model = resolve(model, "model")
    if not callable(model):
        raise ValueError(f"model: expected an nn.Module, a factory or an import path, got {type(model).__name__}")
    net = model(**kwargs)
    if not isinstance(net, nn.Module):
        raise ValueError(f"model: the factory returned {type(net).__name__}, not an nn.Module")
    return net


def load_compressed(path: str, map_location="cpu", model=None) -> tuple[nn.Module, dict]:
    """The saved model (eval mode) and its record. `model`: see the module docstring."""
    from .compress import guard_fast_paths

    payload = read_payload(path, map_location)
    try:
        net = _rebuild(payload, model, path)
    except (TypeError, KeyError, IndexError) as exc:  # a builder refusing the file's options: not ours
        raise ValueError(f"model file: {path} is not a ranksearch model ({type(exc).__name__}: {str(exc)[:200]})") from None
    for name, spec in payload["layers"].items():
        parent_name, _, child = name.rpartition(".")
        try:
            parent = net.get_submodule(parent_name) if parent_name else net
        except AttributeError:
            raise ValueError(f"model: has no submodule {parent_name!r} for saved layer {name!r}; "
                             "is it the architecture the file was saved from?") from None
        try:
            layer = LAYER_CLASSES[spec["kind"]](**spec["config"])
        except (TypeError, ValueError, KeyError, IndexError, RuntimeError) as exc:
            raise ValueError(f"model file: {path} is not a ranksearch model (layer {name!r}: "
                             f"{type(exc).__name__}: {str(exc)[:200]})") from None
        setattr(parent, child, layer)
    guard_fast_paths(net)
    try:
        net.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise ValueError(f"model: the saved weights do not fit it ({str(exc).splitlines()[0]})") from None
    return net.eval(), payload.get("record") or {}


@torch.no_grad()
def dense_state_dict(state_dict: dict, layers: dict) -> dict:
    """The state_dict with every factorized layer as its dense `weight` (and `bias`): loads into
    the original, uncompressed architecture."""
    out = {k: v for k, v in state_dict.items() if not any(k.startswith(f"{name}.") for name in layers)}
    for name, spec in layers.items():
        layer = LAYER_CLASSES[spec["kind"]](**spec["config"])
        prefix = f"{name}."
        layer.load_state_dict({k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)})
        out[f"{name}.weight"] = layer.dense_weight().detach().clone()
        if getattr(layer, "bias", None) is not None:
            out[f"{name}.bias"] = layer.bias.detach().clone()
    return out


def load(path: str, model=None, map_location="cpu") -> nn.Module:
    """`ranksearch.load`: a saved compressed model in eval mode; its record is `model.ranksearch_record`."""
    net, record = load_compressed(path, map_location, model)
    net.ranksearch_record = record
    return net
