"""Quantizer math: the uniform quantizer, int4 packing and weight quantization."""

from dqcompile.quant.packing import pack_int4, unpack_int4
from dqcompile.quant.uniform import (
    GRANULARITIES,
    Granularity,
    QParams,
    compute_qparams,
    dequantize,
    fake_quantize,
    qrange,
    quantize,
)
from dqcompile.quant.weights import QuantizedWeight, quantize_weight

__all__ = [
    "GRANULARITIES",
    "Granularity",
    "QParams",
    "QuantizedWeight",
    "compute_qparams",
    "dequantize",
    "fake_quantize",
    "pack_int4",
    "qrange",
    "quantize",
    "quantize_weight",
    "unpack_int4",
]
