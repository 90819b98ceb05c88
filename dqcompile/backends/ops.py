"""Registers the dqcompile custom ops (docs/CONTRACTS.md) as ``torch.ops.dqcompile.*``.

Each op is a ``torch.library.custom_op`` whose implementation, for every device, is the function of the
same name in ``reference.py``, plus a fake (meta) implementation that computes output shapes and dtypes
from input shapes alone. The ops are therefore opaque single nodes to torch.export and torch.compile, which
trace them without graph breaks, symbolic (dynamic) batch sizes included.

Importing this module twice (or reloading it) is harmless: ops already defined are left as they are.
"""

from collections.abc import Callable

import torch
from torch import Tensor

from dqcompile.backends import reference

NAMESPACE = "dqcompile"


def _quantize_act_fake(x: Tensor, bits: int, group_size: int, symmetric: bool) -> tuple[Tensor, Tensor, Tensor]:
    groups = x.shape[-1] // group_size if group_size else 1
    stats_shape = (*x.shape[:-1], groups)
    return (
        x.new_empty(x.shape, dtype=torch.int8),
        x.new_empty(stats_shape, dtype=torch.float32),
        x.new_empty(stats_shape, dtype=torch.int32),
    )


def _quantize_act_per_sample_fake(
    x: Tensor, bits: int, group_size: int, symmetric: bool
) -> tuple[Tensor, Tensor, Tensor]:
    groups = x.shape[-1] // group_size if group_size else 1
    stats_shape = (x.shape[0], *[1] * (x.dim() - 2), groups)
    return (
        x.new_empty(x.shape, dtype=torch.int8),
        x.new_empty(stats_shape, dtype=torch.float32),
        x.new_empty(stats_shape, dtype=torch.int32),
    )


def _ln_modulate_quantize_fake(
    x: Tensor,
    ln_weight: Tensor | None,
    ln_bias: Tensor | None,
    eps: float,
    mod_scale: Tensor,
    mod_shift: Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    return _quantize_act_fake(x, bits, group_size, symmetric)


def _quantize_act_static_fake(x: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    return x.new_empty(x.shape, dtype=torch.int8)


def _int_linear_fake(
    qx: Tensor,
    x_scale: Tensor,
    x_zero: Tensor,
    qw: Tensor,
    w_scale: Tensor,
    bias: Tensor | None,
    w_bits: int,
    group_size: int,
    out_dtype: torch.dtype,
) -> Tensor:
    return qx.new_empty((*qx.shape[:-1], qw.shape[0]), dtype=out_dtype)


def _weight_only_linear_fake(
    x: Tensor, qw: Tensor, w_scale: Tensor, bias: Tensor | None, w_bits: int, group_size: int
) -> Tensor:
    return x.new_empty((*x.shape[:-1], qw.shape[0]))


def _quantize_act_mrq_fake(
    x: Tensor, low_scale: Tensor, high_scale: Tensor, bits: int, split_at_zero: bool
) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape, dtype=torch.int8)


def _int_attention_fake(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_scale: Tensor,
    k_scale: Tensor,
    v_scale: Tensor,
    p_low_scale: Tensor | None,
    bits: int,
    scale: float,
) -> Tensor:
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def _int_matmul_fake(a: Tensor, b: Tensor) -> Tensor:
    return a.new_empty((a.shape[0], b.shape[0]), dtype=torch.int32)


# The schemas of CONTRACTS.md, verbatim. Spelled out rather than inferred from the annotations, which
# would type the integer arguments SymInt: bit widths and group sizes are compile-time constants.
_SCHEMAS: dict[str, str] = {
    "quantize_act": "(Tensor x, int bits, int group_size, bool symmetric) -> (Tensor q, Tensor scale, Tensor zero)",
    "quantize_act_per_sample": "(Tensor x, int bits, int group_size, bool symmetric) "
    "-> (Tensor q, Tensor scale, Tensor zero)",
    "quantize_act_static": "(Tensor x, Tensor scale, Tensor zero, int bits) -> Tensor q",
    "ln_modulate_quantize": "(Tensor x, Tensor? ln_weight, Tensor? ln_bias, float eps, Tensor mod_scale, "
    "Tensor mod_shift, int bits, int group_size, bool symmetric) -> (Tensor q, Tensor scale, Tensor zero)",
    "int_linear": "(Tensor qx, Tensor x_scale, Tensor x_zero, Tensor qw, Tensor w_scale, Tensor? bias, "
    "int w_bits, int group_size, ScalarType out_dtype) -> Tensor",
    "weight_only_linear": "(Tensor x, Tensor qw, Tensor w_scale, Tensor? bias, int w_bits, int group_size) -> Tensor",
    "int_matmul": "(Tensor a, Tensor b) -> Tensor",
    "quantize_act_mrq": "(Tensor x, Tensor low_scale, Tensor high_scale, int bits, bool split_at_zero) "
    "-> (Tensor q_low, Tensor q_high)",
    "int_attention": "(Tensor q, Tensor k, Tensor v, Tensor q_scale, Tensor k_scale, Tensor v_scale, "
    "Tensor? p_low_scale, int bits, float scale) -> Tensor",
}

# op name -> (implementation for every device, fake implementation)
_IMPLS: dict[str, tuple[Callable[..., object], Callable[..., object]]] = {
    "quantize_act": (reference.quantize_act, _quantize_act_fake),
    "quantize_act_per_sample": (reference.quantize_act_per_sample, _quantize_act_per_sample_fake),
    "quantize_act_static": (reference.quantize_act_static, _quantize_act_static_fake),
    "ln_modulate_quantize": (reference.ln_modulate_quantize, _ln_modulate_quantize_fake),
    "int_linear": (reference.int_linear, _int_linear_fake),
    "weight_only_linear": (reference.weight_only_linear, _weight_only_linear_fake),
    "int_matmul": (reference.int_matmul, _int_matmul_fake),
    "quantize_act_mrq": (reference.quantize_act_mrq, _quantize_act_mrq_fake),
    "int_attention": (reference.int_attention, _int_attention_fake),
}


def _is_defined(name: str) -> bool:
    return hasattr(getattr(torch.ops, NAMESPACE), name)


def _register_all() -> None:
    for name, (impl, fake) in _IMPLS.items():
        if _is_defined(name):
            continue
        op = torch.library.custom_op(f"{NAMESPACE}::{name}", impl, mutates_args=(), schema=_SCHEMAS[name])
        op.register_fake(fake)


_register_all()
