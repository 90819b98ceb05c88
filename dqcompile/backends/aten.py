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

from dqcompile.backends import cpu_path, reference
from dqcompile.backends.ops import register_kernel

# The quantizers' reference implementations are already ATen ops with no data-dependent Python (the
# checks look at shapes and constants), so they are their own decompositions.
register_kernel("aten", "quantize_act", reference.quantize_act, decomposition=True)
register_kernel("aten", "ln_modulate_quantize", reference.ln_modulate_quantize, decomposition=True)
register_kernel("aten", "gelu_quantize", reference.gelu_quantize, decomposition=True)
register_kernel("aten", "quantize_act_static", reference.quantize_act_static, decomposition=True)
register_kernel("aten", "int_linear", cpu_path.int_linear_decomposed, decomposition=True)
