"""Tensor formats every factorized layer supports, and the keys that set a layer's mode shapes
(`tensorize(shapes=...)`, a spec's `shapes`): torch-free, so the spec schema can import them."""

FORMATS = ("cp", "tucker", "tt", "ttm")
LAYER_SHAPE_KEYS = ("in_shape", "out_shape")  # Linear, Conv2d
TABLE_SHAPE_KEYS = ("shape",)  # Embedding, EmbeddingBag: [row factors, dim factors]
