"""dqcompile: post-training quantization compiler for diffusion transformers.

    import dqcompile
    qmodel = dqcompile.quantize(model, "w8a8")          # drop-in replacement running integer ops
    dqcompile.save(qmodel, "out/"); dqcompile.load("out/")
"""

from dqcompile.api import load, quantize, save
from dqcompile.capture import Captured, capture
from dqcompile.model import QuantizedModel
from dqcompile.report import QuantReport
from dqcompile.spec import ActivationSpec, QuantSpec, WeightSpec, presets

__all__ = [
    "ActivationSpec",
    "Captured",
    "QuantReport",
    "QuantSpec",
    "QuantizedModel",
    "WeightSpec",
    "capture",
    "load",
    "presets",
    "quantize",
    "save",
]
