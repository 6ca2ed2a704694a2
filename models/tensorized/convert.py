"""Turning dense layers into factorized ones: `from_dense` (decompose one trained layer)
and `tensorize` (replace the layers of a whole model in place)."""

from __future__ import annotations

import fnmatch
import math

import torch
from torch import nn

from .layers import FactorizedConv2d, FactorizedEmbedding, FactorizedEmbeddingBag, FactorizedLayer, FactorizedLinear
from .names import LAYER_SHAPE_KEYS, TABLE_SHAPE_KEYS

CONVERTIBLE = (nn.Linear, nn.Conv2d, nn.Embedding, nn.EmbeddingBag)


def _supported(layer: nn.Module) -> bool:
    """Grouped convs, non-zero padding modes and string padding have no factorized counterpart."""
    if isinstance(layer, nn.Conv2d):
        return layer.groups == 1 and layer.padding_mode == "zeros" and not isinstance(layer.padding, str)
    return isinstance(layer, CONVERTIBLE)


def _empty_like(layer: nn.Module, format: str, max_rank, **shape_kw) -> FactorizedLayer:
    """A randomly initialized factorized layer with the same interface as `layer`."""
    if isinstance(layer, nn.Linear):
        return FactorizedLinear(layer.in_features, layer.out_features, format=format, max_rank=max_rank,
                                bias=layer.bias is not None, **shape_kw)
    if isinstance(layer, nn.Conv2d):
        if not _supported(layer):
            raise ValueError(f"layer: only Conv2d with groups=1, zero padding given as numbers is supported, got {layer}")
        return FactorizedConv2d(layer.in_channels, layer.out_channels, layer.kernel_size, format=format,
                                max_rank=max_rank, stride=layer.stride, padding=layer.padding,
                                dilation=layer.dilation, bias=layer.bias is not None, **shape_kw)
    if isinstance(layer, nn.EmbeddingBag):
        return FactorizedEmbeddingBag(layer.num_embeddings, layer.embedding_dim, format=format, max_rank=max_rank,
                                      mode=layer.mode, include_last_offset=layer.include_last_offset, **shape_kw)
    if isinstance(layer, nn.Embedding):
        return FactorizedEmbedding(layer.num_embeddings, layer.embedding_dim, format=format, max_rank=max_rank,
                                   **shape_kw)
    raise ValueError(f"layer: expected one of {[c.__name__ for c in CONVERTIBLE]}, got {type(layer).__name__}")


def _padded_dense(new: FactorizedLayer, weight: torch.Tensor) -> torch.Tensor:
    """The dense weight zero-padded and reshaped to the factorized tensor's modes."""
    w = weight.detach()
    if isinstance(new, FactorizedLinear):
        rows, cols, extra = math.prod(new.out_shape), math.prod(new.in_shape), []
    elif isinstance(new, FactorizedConv2d):
        rows, cols = math.prod(new.out_shape), math.prod(new.in_shape)
        extra = [w.shape[2] * w.shape[3]] if w.shape[2] * w.shape[3] > 1 else []
        w = w.reshape(w.shape[0], w.shape[1], -1)
    else:
        rows, cols, extra = math.prod(new.row_shape), math.prod(new.col_shape), []
    padded = w.new_zeros(rows, cols, *([w.shape[2]] if extra else []))
    padded[: w.shape[0], : w.shape[1]] = w.reshape(w.shape[0], w.shape[1], *([-1] if extra else []))
    return padded.reshape(new.weight.modes)


def from_dense(layer: nn.Module, format: str, max_rank, **shape_kw) -> FactorizedLayer:
    """A factorized layer initialized by decomposing a trained dense one
    (TT-SVD for tt/ttm, truncated HOSVD for tucker, CP-ALS for cp)."""
    new = _empty_like(layer, format, max_rank, **shape_kw)
    new.weight.decompose_from(_padded_dense(new, layer.weight))
    if getattr(layer, "bias", None) is not None:
        with torch.no_grad():
            new.bias.copy_(layer.bias)
    return new


def _selected(name: str, include, exclude) -> bool:
    if include is not None and not any(fnmatch.fnmatchcase(name, p) for p in include):
        return False
    return not (exclude and any(fnmatch.fnmatchcase(name, p) for p in exclude))


SHAPE_KEYS = {nn.Linear: LAYER_SHAPE_KEYS, nn.Conv2d: LAYER_SHAPE_KEYS,
              nn.Embedding: TABLE_SHAPE_KEYS, nn.EmbeddingBag: TABLE_SHAPE_KEYS}


def check_shapes(shapes, targets: dict[str, nn.Module]) -> dict[str, dict]:
    """`shapes` ({layer name: {in_shape/out_shape, or shape for tables}}) validated against the layers
    tensorize replaces, so a misspelt layer or key is an error naming it rather than silently ignored."""
    if shapes is None:
        return {}
    if not isinstance(shapes, dict):
        raise ValueError(f"shapes: expected a mapping layer name -> {{in_shape, out_shape}}, got {shapes!r}")
    for name, given in shapes.items():
        if name not in targets:
            raise ValueError(f"shapes.{name}: not a layer this run factorizes; those are: {', '.join(targets) or 'none'}")
        keys = next(k for cls, k in SHAPE_KEYS.items() if isinstance(targets[name], cls))
        if not isinstance(given, dict) or not given or set(given) - set(keys):
            raise ValueError(f"shapes.{name}: expected a mapping with {' and/or '.join(keys)}, got {given!r}")
    return shapes


def tensorize(model: nn.Module, *, format: str, max_rank, min_params: int = 1024, include=None, exclude=None,
              init: str = "random", shapes: dict | None = None) -> list[dict]:
    """Replace Linear/Conv2d/Embedding/EmbeddingBag layers of `model` in place.

    A layer is replaced when it has at least `min_params` weights and its name
    matches `include` (glob patterns; all when None) and not `exclude`. Convs
    without a factorized counterpart (grouped, non-zero padding modes) are left
    dense. Every new layer is built before any is swapped in, so an error leaves
    the model unchanged.
    `init="random"` keeps the replaced layer's weight scale (so the model's own
    init scheme survives); `init="decompose"` decomposes its trained weights.
    `shapes` sets a layer's mode shapes by name ({"fc1": {"in_shape": [4, 7, 4, 7], "out_shape":
    [4, 4, 8, 4]}}, tables {"shape": [rows, dims]}); the others get balanced ones.
    Returns one dict per replaced layer: name, kind, format, shape, ranks, params.
    """
    if init not in ("random", "decompose"):
        raise ValueError(f"init: expected 'random' or 'decompose', got {init!r}")
    if isinstance(min_params, bool) or not isinstance(min_params, int) or min_params < 0:
        raise ValueError(f"min_params: expected a non-negative integer, got {min_params!r}")
    targets = [
        (name, module) for name, module in model.named_modules()
        if isinstance(module, CONVERTIBLE) and _supported(module) and module.weight.numel() >= min_params
        and _selected(name, include, exclude)
    ]
    shapes = check_shapes(shapes, dict(targets))
    replacements = []
    for name, module in targets:
        try:
            new = (from_dense if init == "decompose" else _empty_like)(module, format, max_rank, **shapes.get(name, {}))
        except ValueError as exc:
            if name not in shapes:
                raise
            raise ValueError(f"shapes.{name}.{exc}") from None
        if init != "decompose":
            new.reset_parameters(std=float(module.weight.detach().std()))
            if getattr(module, "bias", None) is not None:
                with torch.no_grad():
                    new.bias.copy_(module.bias)
        new.to(module.weight.device, module.weight.dtype)
        replacements.append((name, new))
    report = []
    for name, new in replacements:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        report.append({"layer": name, **new.describe()})
    return report


def factorized_layers(model: nn.Module) -> dict[str, FactorizedLayer]:
    """Every factorized layer of a model, by name: what rank-selection methods drive."""
    return {name: m for name, m in model.named_modules() if isinstance(m, FactorizedLayer)}


def model_params(model: nn.Module, effective: bool = True) -> int:
    """Parameters of a model, counting only kept rank slices of factorized layers."""
    layers = factorized_layers(model).values()
    factor_ids = {id(p) for layer in layers for p in layer.weight.factors}
    plain = sum(p.numel() for p in model.parameters() if id(p) not in factor_ids)
    return plain + sum(layer.weight.num_parameters(effective) for layer in layers)


def dense_model_params(model: nn.Module) -> int:
    """Parameters the model would have with every factorized layer dense."""
    layers = factorized_layers(model).values()
    return model_params(model) - sum(l.num_parameters() - l.dense_parameters() for l in layers)
