"""The "aten" backend: dqcompile ops as decompositions into ATen ops, for Inductor to compile and fuse.

Importing this module fills the "aten" column of the op table (`dqcompile.backends.ops`) with
decompositions (`register_kernel(..., decomposition=True)`). The compile backend inlines them in place of
the opaque ops, so Inductor's code generation (C++ on CPU, Triton on GPU) fuses the activation
quantizers into the LayerNorm / modulation / GELU / copy that produces their input, and the int_linear
epilogue (zero-point term, scales, bias, cast) into one loop after the GEMM. The GEMM itself stays an
extern call (`cpu_path.exact_int_products`: a float32 BLAS GEMM over the integer codes, exact by
construction, or torch._int_mm where that is the faster exact path).

Numerics: the decompositions compute the reference's formulas; compiled, Inductor may reorder or contract
float operations, so outputs match the reference within the output dtype's rounding (and a value on a
quantizer's rounding boundary may take the neighbouring code), as docs/CONTRACTS.md allows for compiled
graphs. Integer sums stay exact.

It is the default kernel backend of `torch.compile(qmodel, backend="dqcompile")` on CPU.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dqcompile.backends import cpu_path, reference
from dqcompile.backends.ops import register_kernel
from dqcompile.quant.uniform import QParams, quantize

QuantizedActs = tuple[Tensor, Tensor, Tensor]


# The quantizers: the reference's formulas as plain ATen ops (statistics, then one elementwise chain that
# Inductor fuses with the producer of x), without the eager CPU path's row blocks.

def quantize_act(x: Tensor, bits: int, group_size: int, symmetric: bool) -> QuantizedActs:
    qp = reference._dynamic_qparams(x, bits, symmetric, group_size)
    return quantize(x, qp), qp.scale, qp.zero


def ln_modulate_quantize(x: Tensor, ln_weight: Tensor | None, ln_bias: Tensor | None, eps: float,
                         mod_scale: Tensor, mod_shift: Tensor, bits: int, group_size: int,
                         symmetric: bool) -> QuantizedActs:
    weight = None if ln_weight is None else ln_weight.float()
    bias = None if ln_bias is None else ln_bias.float()
    normalized = torch.nn.functional.layer_norm(x.float(), (x.shape[-1],), weight, bias, eps)
    return quantize_act(normalized * (1 + mod_scale.float()) + mod_shift.float(), bits, group_size, symmetric)


def gelu_quantize(x: Tensor, approximate: str, bits: int, group_size: int, symmetric: bool) -> QuantizedActs:
    return quantize_act(torch.nn.functional.gelu(x, approximate=approximate), bits, group_size, symmetric)


def quantize_act_static(x: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    return quantize(x, QParams(scale=scale, zero=zero, bits=bits, symmetric=False, group_size=0))


register_kernel("aten", "quantize_act", quantize_act, decomposition=True)
register_kernel("aten", "ln_modulate_quantize", ln_modulate_quantize, decomposition=True)
register_kernel("aten", "gelu_quantize", gelu_quantize, decomposition=True)
register_kernel("aten", "quantize_act_static", quantize_act_static, decomposition=True)
register_kernel("aten", "int_linear", cpu_path.int_linear_decomposed, decomposition=True)
