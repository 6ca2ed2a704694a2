"""Tensor formats every factorized layer supports."""

FORMATS = ("cp", "tucker", "tt", "ttm")
