"""Factorized (tensorized) layers with one shared, prunable rank mechanism."""

from .convert import dense_model_params, factorized_layers, from_dense, model_params, tensorize
from .factorized import FactorizedTensor
from .formats import CP, TensorTrain, Tucker, build_tensor
from .layers import (
    FactorizedConv2d,
    FactorizedEmbedding,
    FactorizedEmbeddingBag,
    FactorizedLayer,
    FactorizedLinear,
)
from .names import FORMATS
from .shapes import factorize

__all__ = [
    "CP", "FORMATS", "FactorizedConv2d", "FactorizedEmbedding", "FactorizedEmbeddingBag", "FactorizedLayer",
    "FactorizedLinear", "FactorizedTensor", "TensorTrain", "Tucker", "build_tensor", "factorize",
    "dense_model_params", "factorized_layers", "from_dense", "model_params", "tensorize",
]
