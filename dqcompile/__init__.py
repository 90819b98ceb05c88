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
from dqcompile.methods import Method, register_method, register_preset
from dqcompile.methods.ptq4dit import AdaLNPair, AttentionPair, PTQ4DiTOptions, find_adaln_pairs
from dqcompile.methods.qdit import GroupPlan, search_group_sizes
from dqcompile.methods.tqdit import TQDiTOptions
from dqcompile.plan import ModelPlan
from dqcompile.report import QuantReport
from dqcompile.spec import ActivationSpec, GPTQOptions, QuantSpec, WeightSpec, presets

register_backend()  # torch.compile(model, backend="dqcompile")

from dqcompile import integrations  # noqa: E402

integrations.register()  # diffusers: quantization_config={"quant_method": "dqcompile", ...}, from_pretrained

__all__ = [
    "ActivationSpec",
    "AdaLNPair",
    "AttentionPair",
    "CalibrationSet",
    "Captured",
    "GPTQOptions",
    "GroupPlan",
    "Method",
    "ModelPlan",
    "PTQ4DiTOptions",
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
    "register_method",
    "register_preset",
    "save",
    "search_group_sizes",
]
