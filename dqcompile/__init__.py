"""dqcompile: post-training quantization compiler for diffusion transformers.

    import dqcompile
    qmodel = dqcompile.quantize(model, "w8a8")          # drop-in replacement running integer ops
    dqcompile.save(qmodel, "out/"); dqcompile.load("out/")
    fast = torch.compile(qmodel, backend="dqcompile")   # fused quantization, Triton kernels on CUDA
"""

from dqcompile.api import load, quantize, save
from dqcompile.backends.compile import register_backend
from dqcompile.calib.trajectories import CalibrationSet, calibration_set
from dqcompile.capture import Captured, capture
from dqcompile.model import QuantizedModel
from dqcompile.passes.find_adaln_pairs import AdaLNPair, AttentionPair, find_adaln_pairs
from dqcompile.report import QuantReport
from dqcompile.search import GroupPlan, search_group_sizes
from dqcompile.spec import ActivationSpec, QDiTOptions, QuantSpec, TQDiTOptions, WeightSpec, presets

register_backend()  # torch.compile(model, backend="dqcompile")

__all__ = [
    "ActivationSpec",
    "AdaLNPair",
    "AttentionPair",
    "CalibrationSet",
    "Captured",
    "GroupPlan",
    "QDiTOptions",
    "QuantReport",
    "QuantSpec",
    "QuantizedModel",
    "TQDiTOptions",
    "WeightSpec",
    "calibration_set",
    "capture",
    "find_adaln_pairs",
    "load",
    "presets",
    "quantize",
    "save",
    "search_group_sizes",
]
