"""Triton kernels for the dqcompile ops: integer GEMMs (gemm.py) and fused activation quantization (quantize.py).

Importing this package fills the "triton" column of the op table with `dqcompile.backends.register_kernel`:
int_linear, int_matmul, quantize_act, quantize_act_static, ln_modulate_quantize (LayerNorm + adaLN
modulation + dynamic quantization in one kernel) and gelu_quantize (GELU + dynamic quantization in one
kernel) run on Triton, as `torch.library.triton_op`s; the other ops (per-sample groups, MRQ's two-region
codes, integer attention) have no Triton kernel and keep the reference.

The package imports on any machine. Without the `triton` package the kernel set is still registered,
and requesting a kernel (calling it, or reading one of the names below) raises an ImportError that says
what is missing. The kernels need CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before this
package is imported (the Triton interpreter, used by the tests).

    from dqcompile.backends import triton as triton_kernels
    y = triton_kernels.triton_int_linear(qx, x_scale, x_zero, qw, w_scale, bias, 8, 0, torch.bfloat16)
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import os
from collections.abc import Callable
from typing import Any, Optional

import torch

from dqcompile.backends import register_kernel

# Group sizes the Triton GEMM steps through: Triton refuses an int8 dot narrower than 32 in K on sm_90
# (the interpreter does not check it). Declared here, where no Triton import is needed, for the op table.
GEMM_GROUP_MULTIPLE = 32

_KERNEL_NAMES = {
    "GemmConfig": "gemm",
    "choose_gemm_config": "gemm",
    "gemm_candidate_configs": "gemm",
    "set_autotune": "gemm",
    "triton_int_linear": "gemm",
    "triton_int_matmul": "gemm",
    "weight_group_sums": "gemm",
    "gelu_quantize": "quantize",
    "ln_modulate_quantize": "quantize",
    "quantize_act": "quantize",
    "quantize_act_static": "quantize",
}

__all__ = ["GEMM_GROUP_MULTIPLE", "is_available", "require_kernel_device", *sorted(_KERNEL_NAMES)]


def is_available() -> bool:
    """Whether the `triton` package is installed (kernels still need CUDA or the interpreter to run)."""
    return importlib.util.find_spec("triton") is not None


def require_kernel_device(*tensors: torch.Tensor) -> None:
    """Raise a clear error unless the tensors can feed a Triton kernel (CUDA, or CPU under the interpreter)."""
    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    for tensor in tensors:
        if tensor.device.type != "cuda" and not (interpreting and tensor.device.type == "cpu"):
            raise RuntimeError(f"dqcompile's Triton kernels need CUDA tensors, got one on {tensor.device} "
                               "(CPU tensors run only under TRITON_INTERPRET=1; use the 'reference' backend)")


def _missing_triton() -> ImportError:
    return ImportError("dqcompile's Triton kernels need the `triton` package (pip install triton; it ships with "
                       "torch's CUDA wheels on Linux); use the 'reference' backend otherwise")


def __getattr__(name: str) -> Any:
    """Load a kernel module on first use of one of its names."""
    if name not in _KERNEL_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if not is_available():
        raise _missing_triton()
    module = importlib.import_module(f"{__name__}.{_KERNEL_NAMES[name]}")
    return getattr(module, name)


_SCHEMA_TYPES: dict[str, Any] = {"Tensor": torch.Tensor, "Tensor?": Optional[torch.Tensor], "int": int, "float": float,
                                 "bool": bool, "str": str, "ScalarType": torch.dtype}


def _signature(op: str) -> inspect.Signature:
    """The Python signature of op `op`'s schema (annotated parameters, defaults, return types).

    torch.library.triton_op before torch 2.12 ignores its `schema` argument and infers the schema from the
    function's annotations; a kernel registered as a triton_op therefore carries the op's signature.
    (Integer arguments then come out as SymInt in the registered schema, which accepts the same calls.)
    """
    from dqcompile.backends import op_def

    schema = op_def(op).schema
    arguments, returns = schema.split("->")
    parameters = []
    for item in arguments.strip()[1:-1].split(","):
        type_name, name = item.split()
        default = inspect.Parameter.empty
        if "=" in name:
            name, default_text = name.split("=")
            default = None if default_text == "None" else ast.literal_eval(default_text)
        parameters.append(inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                            annotation=_SCHEMA_TYPES[type_name], default=default))
    outputs = returns.count("Tensor")
    return_annotation = torch.Tensor if outputs == 1 else tuple[(torch.Tensor,) * outputs]  # type: ignore[misc]
    return inspect.Signature(parameters, return_annotation=return_annotation)


def _kernel(name: str, op: str) -> Callable[..., Any]:
    """A call-time proxy for kernel `name` with op `op`'s signature, so registering imports no Triton code."""

    def call(*args: Any, **kwargs: Any) -> Any:
        return __getattr__(name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    call.__signature__ = _signature(op)  # type: ignore[attr-defined]
    call.__annotations__ = {}  # the signature's annotations are the real ones
    return call


def _int_linear(qx: torch.Tensor, x_scale: torch.Tensor, x_zero: Optional[torch.Tensor], qw: torch.Tensor,
                w_scale: torch.Tensor, bias: Optional[torch.Tensor], w_bits: int, group_size: int,
                out_dtype: torch.dtype, w_sum: Optional[torch.Tensor] = None) -> torch.Tensor:
    """int_linear's schema order (w_sum positional) onto triton_int_linear."""
    return __getattr__("triton_int_linear")(qx, x_scale, x_zero, qw, w_scale, bias, w_bits, group_size, out_dtype,
                                            w_sum)


_int_linear.__signature__ = _signature("int_linear")  # type: ignore[attr-defined]


# The "triton" column of the op table (dqcompile/backends/ops.py). The launchers are traceable (shapes,
# strides and dtypes decide everything; kernels launch through torch.library.wrap_triton), so they register
# as torch.library.triton_op: Inductor traces each once and launches its kernels from the generated code,
# with no Python per call. The GEMM takes groups in multiples of GEMM_GROUP_MULTIPLE: other group sizes stay
# on the reference.
register_kernel("triton", "quantize_act", _kernel("quantize_act", "quantize_act"), triton_op=True)
register_kernel("triton", "quantize_act_static", _kernel("quantize_act_static", "quantize_act_static"), triton_op=True)
register_kernel("triton", "ln_modulate_quantize", _kernel("ln_modulate_quantize", "ln_modulate_quantize"),
                triton_op=True)
register_kernel("triton", "gelu_quantize", _kernel("gelu_quantize", "gelu_quantize"), triton_op=True)
register_kernel("triton", "int_linear", _int_linear, triton_op=True,
                accepts=lambda args: args["group_size"] % GEMM_GROUP_MULTIPLE == 0)
register_kernel("triton", "int_matmul", _kernel("triton_int_matmul", "int_matmul"), triton_op=True)
