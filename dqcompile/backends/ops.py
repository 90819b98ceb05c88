"""The op table: every dqcompile op declared once, and the one function through which backends add kernels.

Each op is one `OpDef` in `OP_TABLE`: its name, its schema (the only place the signature is written),
its fake (meta) implementation, its reference implementation (``reference.py``, the specification of its
numerics) and a column of kernels, one per backend. From that entry this module registers
``torch.ops.dqcompile.<name>`` (a ``torch.library.custom_op`` whose implementation on every device is
the reference, with the fake), so the op is one opaque node to torch.export and torch.compile.

A backend is a module that fills its column with `register_kernel`. A kernel registered for backend
``B`` becomes ``torch.ops.dqcompile.<name>_<B>``, with the op's schema and fake; the compile backend
(``compile.py``) re-targets graph nodes to it (`kernel`, `bind_arguments`). Eager calls of
``torch.ops.dqcompile.<name>`` always run the reference.

Importing this module twice (or reloading it) is harmless: the table and the registered ops survive.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from dqcompile.backends import reference

NAMESPACE = "dqcompile"

KernelKind = Literal["custom_op", "triton_op", "decomposition"]


@dataclass(frozen=True)
class Kernel:
    """One backend's implementation of one op (an entry of an `OpDef`'s kernel column).

    Attributes:
        backend, op: the column and the row.
        fn: the implementation, called with the op's arguments in schema order.
        kind: "custom_op" (opaque ``torch.library.custom_op``: ``fn`` runs in Python at every call),
            "triton_op" (``torch.library.triton_op``: Inductor traces ``fn`` once and launches its
            Triton kernels from its generated code) or "decomposition" (no op: the compile backend
            inlines ``fn``, written in ATen-level torch ops, so Inductor compiles and fuses it).
        accepts: a predicate over a call's bound arguments (`bind_arguments` of the graph node: tensors
            as FX nodes, ints / bools / floats / dtypes as constants), deciding at compile time whether
            this kernel takes that call; None: every call.
    """

    backend: str
    op: str
    fn: Callable[..., Any]
    kind: KernelKind
    accepts: Callable[[Mapping[str, Any]], bool] | None = None

    @property
    def op_name(self) -> str | None:
        """``<op>_<backend>``, the name under torch.ops.dqcompile; None for a decomposition."""
        return None if self.kind == "decomposition" else f"{self.op}_{self.backend}"

    @property
    def target(self) -> Callable[..., Any]:
        """What a graph node calls to run this kernel: the registered op's overload, or ``fn`` itself."""
        if self.kind == "decomposition":
            return self.fn
        return getattr(getattr(torch.ops, NAMESPACE), self.op_name).default

    def takes(self, arguments: Mapping[str, Any]) -> bool:
        return self.accepts is None or bool(self.accepts(arguments))


@dataclass(frozen=True)
class OpDef:
    """One dqcompile op: the single declaration its registration, its fake and its kernels come from.

    Attributes:
        name: the op is ``torch.ops.dqcompile.<name>``.
        schema: the torch.library schema without the name, e.g. ``"(Tensor x, int bits) -> Tensor"``.
        fake: shapes and dtypes of the outputs from those of the inputs (no data).
        reference: the implementation, on every device; the specification the kernels match.
        summary: one line on what the op computes (the full contract is ``reference``'s docstring).
        fused: inserted only by the compile backend's fusion (``fusion.py``), never by the lowering.
        kernels: backend name -> `Kernel`, filled by `register_kernel`.
    """

    name: str
    schema: str
    fake: Callable[..., Any]
    reference: Callable[..., Any]
    summary: str
    fused: bool = False
    kernels: dict[str, Kernel] = field(default_factory=dict, compare=False, repr=False)

    @functools.cached_property
    def parsed_schema(self) -> torch.FunctionSchema:
        return torch._C.parse_schema(f"{NAMESPACE}::{self.name}{self.schema}")

    @property
    def argument_names(self) -> tuple[str, ...]:
        return tuple(argument.name for argument in self.parsed_schema.arguments)

    @property
    def overload(self) -> torch._ops.OpOverload:
        """``torch.ops.dqcompile.<name>.default``, the target of the op's graph nodes."""
        return getattr(getattr(torch.ops, NAMESPACE), self.name).default


# --------------------------------------------------------------------------------------------- fakes


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


def _ln_modulate_quantize_fake(x: Tensor, ln_weight: Tensor | None, ln_bias: Tensor | None, eps: float,
                               mod_scale: Tensor, mod_shift: Tensor, bits: int, group_size: int,
                               symmetric: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _quantize_act_fake(x, bits, group_size, symmetric)


def _gelu_quantize_fake(x: Tensor, approximate: str, bits: int, group_size: int,
                        symmetric: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _quantize_act_fake(x, bits, group_size, symmetric)


def _quantize_act_static_fake(x: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    return x.new_empty(x.shape, dtype=torch.int8)


def _int_linear_fake(qx: Tensor, x_scale: Tensor, x_zero: Tensor | None, qw: Tensor, w_scale: Tensor,
                     bias: Tensor | None, w_bits: int, group_size: int, out_dtype: torch.dtype,
                     w_sum: Tensor | None = None) -> Tensor:
    return qx.new_empty((*qx.shape[:-1], qw.shape[0]), dtype=out_dtype)


def _weight_only_linear_fake(x: Tensor, qw: Tensor, w_scale: Tensor, bias: Tensor | None, w_bits: int,
                             group_size: int) -> Tensor:
    return x.new_empty((*x.shape[:-1], qw.shape[0]))


def _int_matmul_fake(a: Tensor, b: Tensor) -> Tensor:
    return a.new_empty((a.shape[0], b.shape[0]), dtype=torch.int32)


def _quantize_act_mrq_fake(x: Tensor, low_scale: Tensor, high_scale: Tensor, bits: int,
                           split_at_zero: bool) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape, dtype=torch.int8)


def _int_attention_fake(q: Tensor, k: Tensor, v: Tensor, q_scale: Tensor, k_scale: Tensor, v_scale: Tensor,
                        p_low_scale: Tensor | None, bits: int, scale: float) -> Tensor:
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


# ------------------------------------------------------------------------------------------ the table

_QUANTIZED = "-> (Tensor q, Tensor scale, Tensor zero)"

# Schemas are spelled out rather than inferred from annotations, which would type the integer arguments
# SymInt: bit widths and group sizes are compile-time constants.
_DEFINITIONS: tuple[OpDef, ...] = (
    OpDef("quantize_act", f"(Tensor x, int bits, int group_size, bool symmetric) {_QUANTIZED}",
          _quantize_act_fake, reference.quantize_act,
          "dynamic per-token / per-group quantization of the last dim"),
    OpDef("quantize_act_per_sample", f"(Tensor x, int bits, int group_size, bool symmetric) {_QUANTIZED}",
          _quantize_act_per_sample_fake, reference.quantize_act_per_sample,
          "dynamic quantization with one (scale, zero) per sample and group"),
    OpDef("quantize_act_static", "(Tensor x, Tensor scale, Tensor zero, int bits) -> Tensor q",
          _quantize_act_static_fake, reference.quantize_act_static,
          "static quantization with calibrated scale / zero, full code range"),
    OpDef("ln_modulate_quantize",
          "(Tensor x, Tensor? ln_weight, Tensor? ln_bias, float eps, Tensor mod_scale, Tensor mod_shift, "
          f"int bits, int group_size, bool symmetric) {_QUANTIZED}",
          _ln_modulate_quantize_fake, reference.ln_modulate_quantize,
          "quantize_act(LayerNorm(x) * (1 + mod_scale) + mod_shift), in float32", fused=True),
    OpDef("gelu_quantize", f"(Tensor x, str approximate, int bits, int group_size, bool symmetric) {_QUANTIZED}",
          _gelu_quantize_fake, reference.gelu_quantize,
          "quantize_act(gelu(x, approximate)), the GELU in x's dtype", fused=True),
    OpDef("int_linear",
          "(Tensor qx, Tensor x_scale, Tensor? x_zero, Tensor qw, Tensor w_scale, Tensor? bias, int w_bits, "
          "int group_size, ScalarType out_dtype, Tensor? w_sum=None) -> Tensor",
          _int_linear_fake, reference.int_linear,
          "integer linear: exact int32 group sums, float32 epilogue, cast to out_dtype"),
    OpDef("weight_only_linear",
          "(Tensor x, Tensor qw, Tensor w_scale, Tensor? bias, int w_bits, int group_size) -> Tensor",
          _weight_only_linear_fake, reference.weight_only_linear,
          "float activations times dequantized weights"),
    OpDef("int_matmul", "(Tensor a, Tensor b) -> Tensor", _int_matmul_fake, reference.int_matmul,
          "exact int8 [M, K] x int8 [N, K] -> int32 [M, N]"),
    OpDef("quantize_act_mrq",
          "(Tensor x, Tensor low_scale, Tensor high_scale, int bits, bool split_at_zero) "
          "-> (Tensor q_low, Tensor q_high)",
          _quantize_act_mrq_fake, reference.quantize_act_mrq, "two-region (MRQ) codes"),
    OpDef("int_attention",
          "(Tensor q, Tensor k, Tensor v, Tensor q_scale, Tensor k_scale, Tensor v_scale, Tensor? p_low_scale, "
          "int bits, float scale) -> Tensor",
          _int_attention_fake, reference.int_attention, "attention on integer codes of Q, K, V and P"),
)

# Kept across reloads of this module (a reload re-runs this file in the same module dict), so the
# kernel columns that backends filled are not lost.
try:
    OP_TABLE  # type: ignore[used-before-def]  # noqa: B018
except NameError:
    OP_TABLE: dict[str, OpDef] = {}


def _is_defined(name: str) -> bool:
    return hasattr(getattr(torch.ops, NAMESPACE), name)


def _register_all() -> None:
    for definition in _DEFINITIONS:
        if definition.name in OP_TABLE:
            continue
        if not _is_defined(definition.name):
            op = torch.library.custom_op(f"{NAMESPACE}::{definition.name}", definition.reference, mutates_args=(),
                                         schema=definition.schema)
            op.register_fake(definition.fake)
        OP_TABLE[definition.name] = definition


_register_all()


# ---------------------------------------------------------------------------------------- the lookups


def op_def(name: str) -> OpDef:
    """The table entry of op ``name`` (ValueError naming the known ops otherwise)."""
    if name not in OP_TABLE:
        raise ValueError(f"dqcompile has no op {name!r}; ops: {', '.join(OP_TABLE)}")
    return OP_TABLE[name]


def op_def_of(target: object) -> OpDef | None:
    """The table entry whose op ``target`` (an OpOverload or OpOverloadPacket) is, else None."""
    if isinstance(target, torch._ops.OpOverload):
        name = target.name()
    elif isinstance(target, torch._ops.OpOverloadPacket):
        name = target._qualified_op_name
    else:
        return None
    if not name.startswith(f"{NAMESPACE}::"):
        return None
    return OP_TABLE.get(name.removeprefix(f"{NAMESPACE}::").split(".")[0])


def kernel(backend: str, op: str) -> Kernel | None:
    """Backend ``backend``'s kernel for op ``op``, or None when the column has no entry."""
    return op_def(op).kernels.get(backend)


def backends() -> list[str]:
    """Every backend that registered at least one kernel, sorted ("reference" is implicit)."""
    return sorted({backend for definition in OP_TABLE.values() for backend in definition.kernels})


def bind_arguments(op: str, args: tuple[Any, ...], kwargs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The arguments of a call of ``op`` by name (schema order), defaults filled in.

    Works on graph nodes' ``args`` / ``kwargs`` as on values: the schema says where each argument is, so
    no caller hard-codes positions.
    """
    kwargs = dict(kwargs or {})
    bound: dict[str, Any] = {}
    schema_args = op_def(op).parsed_schema.arguments
    if len(args) > len(schema_args):
        raise TypeError(f"dqcompile.{op} takes {len(schema_args)} arguments, got {len(args)} positional")
    for index, argument in enumerate(schema_args):
        if index < len(args):
            bound[argument.name] = args[index]
        elif argument.name in kwargs:
            bound[argument.name] = kwargs.pop(argument.name)
        elif argument.has_default_value():
            bound[argument.name] = argument.default_value
        else:
            raise TypeError(f"dqcompile.{op}: missing argument {argument.name!r}")
    if kwargs:
        raise TypeError(f"dqcompile.{op}: unexpected arguments {sorted(kwargs)}")
    return bound


def positional_arguments(op: str, bound: Mapping[str, Any]) -> tuple[Any, ...]:
    """The inverse of `bind_arguments`: every argument of ``op``, positionally, in schema order."""
    return tuple(bound[name] for name in op_def(op).argument_names)


# ------------------------------------------------------------------------------------ the registration


def register_kernel(backend: str, op: str, fn: Callable[..., Any], *, triton_op: bool = False,
                    decomposition: bool = False,
                    accepts: Callable[[Mapping[str, Any]], bool] | None = None) -> Kernel:
    """Put ``fn`` in backend ``backend``'s column of op ``op``; returns the `Kernel`.

    The contract a kernel signs:
    - ``fn`` takes the op's arguments positionally, in schema order, with the schema's types (Tensor,
      ``Tensor?`` as Tensor or None, int, bool, float, str, ScalarType as torch.dtype), and the schema's
      defaults for arguments that have one (torch.library omits them when the caller does), returns the
      outputs the op's fake describes (same number, shapes, dtypes, device); it mutates no input.
    - Numerics: it matches the reference implementation (the ``OpDef``'s ``reference``): integer
      results (codes, zero points, int32 accumulators) bit for bit; float outputs within the output
      dtype's rounding unless docs/CONTRACTS.md asks for more (it asks for bit-identical scales).
    - Unless ``decomposition``, it becomes the op ``torch.ops.dqcompile.<op>_<backend>`` with the op's
      schema and fake implementation, which eager code may call directly and the compile backend puts
      in graphs in place of ``torch.ops.dqcompile.<op>``.
    - ``triton_op=True``: registered with ``torch.library.triton_op``. ``fn`` must then be traceable
      (make_fx): torch ops on shapes and dtypes only (no ``.item()``, no data-dependent Python control
      flow, no host syncs), and each Triton launch written ``torch.library.wrap_triton(kernel)[grid](...)``.
      Argument checks and tile choices then run once, at trace time, and Inductor's generated code
      launches the kernels with no Python per call. Eager calls run ``fn`` as is.
    - ``triton_op=False`` (default): registered with ``torch.library.custom_op``: opaque to Inductor,
      ``fn`` runs in Python at each call (for launchers not yet traceable, or CPU kernels).
    - ``decomposition=True``: no op is registered. ``fn`` is written in ATen-level torch ops (plus other
      dqcompile ops if it likes); the compile backend inlines it, so Inductor compiles and fuses it with
      the neighbouring ops (e.g. quantization into the GELU that produces its input).
    - ``accepts``: optional predicate over a call's bound arguments (see `Kernel`); a call it refuses
      keeps the reference op, so a kernel can decline shapes it cannot tile.

    Registering the same (backend, op) again with a function of the same module and name (a reloaded
    module) keeps the first registration; anything else already registered raises ValueError.
    """
    definition = op_def(op)
    if backend == "reference":
        raise ValueError("the 'reference' column is the op itself (OpDef.reference) and cannot be registered")
    if not backend.isidentifier() or backend != backend.lower():
        raise ValueError(f"backend names are lower-case identifiers, got {backend!r}")
    if triton_op and decomposition:
        raise ValueError("a kernel is a triton_op or a decomposition, not both")
    kind: KernelKind = "decomposition" if decomposition else "triton_op" if triton_op else "custom_op"
    existing = definition.kernels.get(backend)
    if existing is not None:
        if _same_function(existing.fn, fn) and existing.kind == kind:
            return existing
        raise ValueError(f"backend {backend!r} already registered a kernel for {op!r} ({existing.fn!r})")
    entry = Kernel(backend=backend, op=op, fn=fn, kind=kind, accepts=accepts)
    if kind != "decomposition" and not _is_defined(entry.op_name):
        qualified = f"{NAMESPACE}::{entry.op_name}"
        if kind == "triton_op":
            registered = torch.library.triton_op(qualified, fn, mutates_args=(), schema=definition.schema)
        else:
            registered = torch.library.custom_op(qualified, fn, mutates_args=(), schema=definition.schema)
        # triton_op registers fn itself as the fake; the table's fake says the same from shapes alone.
        registered.register_fake(definition.fake)
    definition.kernels[backend] = entry
    return entry


def _same_function(a: Callable[..., Any], b: Callable[..., Any]) -> bool:
    a, b = inspect.unwrap(a), inspect.unwrap(b)
    return a is b or (getattr(a, "__module__", None) == getattr(b, "__module__", None)
                      and getattr(a, "__qualname__", None) == getattr(b, "__qualname__", None))


__all__ = ["NAMESPACE", "OP_TABLE", "Kernel", "OpDef", "backends", "bind_arguments", "kernel", "op_def", "op_def_of",
           "positional_arguments", "register_kernel"]
