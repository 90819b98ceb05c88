"""The `torch.compile` backend "dqcompile": fuse activation quantization, pick kernels, hand over to Inductor.

    import dqcompile                      # registers the backend
    compiled = torch.compile(qmodel, backend="dqcompile")                                    # kernels "auto"
    compiled = torch.compile(qmodel, backend="dqcompile", options={"kernels": "reference"})
    compiled = torch.compile(qmodel, backend=make_backend(kernels="triton"))                # same, as a callable

What it does with the FX graph dynamo captured (a QuantizedModel's forward: ATen ops plus the
`torch.ops.dqcompile.*` custom ops, which dynamo keeps as single opaque nodes, so there is no graph break):
1. fusion (`dqcompile.backends.fusion`): each `quantize_act` of a modulated LayerNorm becomes one
   `ln_modulate_quantize` shared by the linears that read it (option "fuse", default True);
2. kernel selection (`select_kernels`): with kernels "triton", the dqcompile ops that have a Triton kernel
   are re-targeted to Triton twins of themselves (below); with "reference", the graph keeps the
   reference ops, the specification;
3. Inductor (`torch._inductor.compile_fx.compile_fx`) compiles the rest: the dqcompile ops stay extern
   kernel calls, everything between them (residuals, attention, GELU, embeddings) is Inductor's.

Options (`torch.compile(..., options={...})`, which dynamo passes to a registered backend as `options`):
    kernels: "auto" (default: "triton" when the quantized tensors are on CUDA and Triton is installed,
             else "reference"), "reference" or "triton";
    fuse:    True (default) or False;
    any other key is an Inductor config option, as with backend="inductor" (e.g. "max_autotune");
    `mode=` ("max-autotune", "reduce-overhead", ...) is Inductor's mode, as with backend="inductor".

Why Triton twins rather than Triton kernels registered for the CUDA dispatch key of the same ops: the
choice is per compiled graph (an option of this backend), not a process-wide switch, and eager calls of
`torch.ops.dqcompile.*` keep meaning the reference. Each twin, `torch.ops.dqcompile.<op>_triton`, is a
custom op with the reference op's schema and fake implementation, so Inductor sees the same opaque node
with the same output shapes. `int_linear_triton` differs in two arguments, both for speed: `x_zero` may
be None (symmetric activations: the kernel skips the zero-point term) and `w_sum`, the per-group sums of
the weight codes that the zero-point term needs; the backend computes them in the graph from the weight
(`weight_group_sums`, which Inductor compiles into one small fused kernel per weight) instead of leaving
the GEMM wrapper to recompute them eagerly on each call.

Dynamic shapes: dynamo specializes on the first batch size it sees and recompiles once, with a symbolic
batch, at the second (timesteps and class labels are tensors and never cause a recompile). To compile
once for every batch size, mark the batch dimension dynamic before the first call:
`torch._dynamo.mark_dynamic(hidden_states, 0)` (and the same for timestep and class_labels).
"""

from __future__ import annotations

import logging
import operator
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.fx import GraphModule, Node

from dqcompile.backends import get_backend
from dqcompile.backends.fusion import LN_MODULATE_QUANTIZE, QUANTIZE_ACT, fuse_ln_modulate_quantize, node_value

log = logging.getLogger(__name__)

BACKEND_NAME = "dqcompile"
KERNEL_CHOICES = ("auto", "reference", "triton")
OPS = torch.ops.dqcompile
INT_LINEAR = OPS.int_linear.default

_TRITON_INT_LINEAR_SCHEMA = (
    "(Tensor qx, Tensor x_scale, Tensor? x_zero, Tensor qw, Tensor w_scale, Tensor? bias, int w_bits, "
    "int group_size, ScalarType out_dtype, Tensor? w_sum) -> Tensor"
)


@dataclass
class RewriteSummary:
    """What the backend did to one graph: the kernel set used and how many nodes each step rewrote."""

    kernels: str
    fused: int = 0
    retargeted: dict[str, int] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ Triton twins

def _int_linear_triton_fake(
    qx: Tensor, x_scale: Tensor, x_zero: Tensor | None, qw: Tensor, w_scale: Tensor, bias: Tensor | None,
    w_bits: int, group_size: int, out_dtype: torch.dtype, w_sum: Tensor | None,
) -> Tensor:
    return qx.new_empty((*qx.shape[:-1], qw.shape[0]), dtype=out_dtype)


def _triton_twins() -> dict[object, object]:
    """reference OpOverload -> its Triton twin; the twins are defined on first use (import of Triton)."""
    if not hasattr(OPS, "int_linear_triton"):
        kernel_set = get_backend("triton")

        def int_linear_triton(qx: Tensor, x_scale: Tensor, x_zero: Tensor | None, qw: Tensor, w_scale: Tensor,
                              bias: Tensor | None, w_bits: int, group_size: int, out_dtype: torch.dtype,
                              w_sum: Tensor | None) -> Tensor:
            return kernel_set.int_linear(qx, x_scale, x_zero, qw, w_scale, bias, w_bits, group_size, out_dtype,
                                         w_sum=w_sum)

        twins = {
            # name: (implementation, schema, fake); a fake that calls the reference op on fake tensors
            # runs the reference op's fake implementation.
            "quantize_act": (kernel_set.quantize_act, None, OPS.quantize_act.default),
            "ln_modulate_quantize": (kernel_set.ln_modulate_quantize, None, OPS.ln_modulate_quantize.default),
            "int_linear": (int_linear_triton, _TRITON_INT_LINEAR_SCHEMA, _int_linear_triton_fake),
        }
        for name, (impl, schema, fake) in twins.items():
            schema = schema or str(getattr(OPS, name).default._schema).removeprefix(f"dqcompile::{name}")
            op = torch.library.custom_op(f"dqcompile::{name}_triton", impl, mutates_args=(), schema=schema)
            op.register_fake(fake)
    return {
        QUANTIZE_ACT: OPS.quantize_act_triton.default,
        LN_MODULATE_QUANTIZE: OPS.ln_modulate_quantize_triton.default,
        INT_LINEAR: OPS.int_linear_triton.default,
    }


# ------------------------------------------------------------------------------------------ kernel selection

def _dqcompile_nodes(gm: GraphModule) -> list[Node]:
    return [node for node in gm.graph.nodes
            if node.op == "call_function" and getattr(node.target, "namespace", None) == "dqcompile"]


def _triton_runs_on(device: torch.device) -> bool:
    """Triton kernels take CUDA tensors, and CPU tensors only under the interpreter (TRITON_INTERPRET=1)."""
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1")


def _check_kernels(kernels: str) -> None:
    if kernels not in KERNEL_CHOICES:
        raise ValueError(f"dqcompile backend: kernels={kernels!r} is not one of {', '.join(KERNEL_CHOICES)}")


def resolve_kernels(gm: GraphModule, kernels: str) -> str:
    """The kernel set for `gm`: `kernels` itself, or for "auto" "triton" where it can run, else "reference".

    Raises ValueError for an unknown choice, or for "triton" with tensors Triton cannot take.
    """
    _check_kernels(kernels)
    from dqcompile.backends import triton as triton_kernels

    devices = {value.device for node in _dqcompile_nodes(gm) if (value := node_value(node.args[0])) is not None}
    if kernels == "auto":
        usable = devices and triton_kernels.is_available() and all(d.type == "cuda" for d in devices)
        return "triton" if usable else "reference"
    if kernels == "triton":
        if not triton_kernels.is_available():
            raise ValueError("dqcompile backend: kernels='triton' needs the `triton` package; use 'reference'")
        for device in devices:
            if not _triton_runs_on(device):
                raise ValueError(f"dqcompile backend: kernels='triton' needs CUDA tensors, the quantized model is on "
                                 f"{device} (CPU runs Triton only under TRITON_INTERPRET=1); use 'reference'")
    return kernels


def _is_symmetric_codes(qx: Node, quantizers: set[object]) -> bool:
    """Whether `qx` are the codes of one of `quantizers` (ops whose last argument is `symmetric`) called
    with symmetric=True: then every zero point is 0."""
    if qx.op != "call_function" or qx.target != operator.getitem:
        return False
    producer = qx.args[0]
    return isinstance(producer, Node) and producer.target in quantizers and producer.args[-1] is True


def select_kernels(gm: GraphModule, kernels: str) -> dict[str, int]:
    """Needs: a graph with dqcompile ops (after the fusion, if any) and `kernels` resolved ("reference"
    or "triton", see `resolve_kernels`).

    Guarantees: with "triton", every `quantize_act`, `ln_modulate_quantize` and `int_linear` node is
    re-targeted to its Triton twin (`int_linear` with a group size the Triton GEMM cannot tile, not a
    multiple of 16, stays on the reference); `int_linear_triton` gets x_zero None after a symmetric
    quantizer, and otherwise a `weight_group_sums` node of its weight (one per weight) as `w_sum`.
    Other ops keep their reference implementation. Returns how many nodes of each op were re-targeted.
    """
    if kernels == "reference":
        return {}
    twins = _triton_twins()
    from dqcompile.backends.triton import weight_group_sums

    dynamic_quantizers = {QUANTIZE_ACT, LN_MODULATE_QUANTIZE, twins[QUANTIZE_ACT], twins[LN_MODULATE_QUANTIZE]}
    counts: dict[str, int] = {}
    weight_sums: dict[Node, Node] = {}
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in twins:
            continue
        args = list(node.args)
        if node.target == INT_LINEAR:
            qx, _, _, qw, _, _, w_bits, group_size, _ = args
            if group_size % 16:
                continue
            w_sum = None
            if _is_symmetric_codes(qx, dynamic_quantizers):
                args[2] = None
            else:
                if qw not in weight_sums:  # nodes come in graph order: this is the weight's first linear
                    with graph.inserting_before(node):
                        # A plain function node: AOTAutograd traces it into ATen ops that Inductor compiles.
                        weight_sums[qw] = graph.call_function(weight_group_sums, (qw, w_bits, group_size))
                w_sum = weight_sums[qw]
            args.append(w_sum)
        name = node.target.name()
        node.target = twins[node.target]
        node.args = tuple(args)
        counts[name] = counts.get(name, 0) + 1
    graph.lint()
    gm.recompile()
    return counts


# ------------------------------------------------------------------------------------------ the backend

def rewrite_graph(gm: GraphModule, *, kernels: str = "auto", fuse: bool = True) -> RewriteSummary:
    """The backend's own passes on a dynamo graph, in place: fusion, then kernel selection."""
    summary = RewriteSummary(kernels=resolve_kernels(gm, kernels))
    if fuse:
        summary.fused = fuse_ln_modulate_quantize(gm)
    summary.retargeted = select_kernels(gm, summary.kernels)
    log.info("dqcompile backend: kernels=%s, %d fused LayerNorm+modulate+quantize, re-targeted %s",
             summary.kernels, summary.fused, summary.retargeted or "nothing")
    return summary


def make_backend(kernels: str = "auto", *, fuse: bool = True, mode: str | None = None,
                 inductor_options: dict[str, Any] | None = None) -> Callable[[GraphModule, list], Callable]:
    """A torch.compile backend (a callable) with these options; `backend="dqcompile"` builds the same one.

    kernels: "auto", "reference" or "triton" (see the module docstring); fuse: apply the fusion;
    mode / inductor_options: Inductor's mode and config options, as torch.compile takes them for Inductor.
    """
    _check_kernels(kernels)
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    config_patches = {**(list_mode_options(mode) if mode else {}), **(inductor_options or {})}

    def dqcompile_backend(gm: GraphModule, example_inputs: list) -> Callable:
        rewrite_graph(gm, kernels=kernels, fuse=fuse)
        return compile_fx(gm, example_inputs, config_patches=config_patches or None)

    return dqcompile_backend


def _registered_backend(gm: GraphModule, example_inputs: list, *, options: dict[str, Any] | None = None,
                        mode: str | None = None) -> Callable:
    """The backend behind the name "dqcompile": torch.compile passes `options` and `mode` here."""
    options = dict(options or {})
    kernels = options.pop("kernels", "auto")
    fuse = options.pop("fuse", True)
    return make_backend(kernels, fuse=fuse, mode=mode, inductor_options=options)(gm, example_inputs)


def register_backend() -> None:
    """Register `_registered_backend` as torch.compile's backend "dqcompile" (once; later calls do nothing)."""
    from torch._dynamo import list_backends
    from torch._dynamo import register_backend as dynamo_register_backend

    if BACKEND_NAME not in list_backends(exclude_tags=()):
        dynamo_register_backend(_registered_backend, name=BACKEND_NAME)


__all__ = ["BACKEND_NAME", "KERNEL_CHOICES", "RewriteSummary", "make_backend", "register_backend",
           "resolve_kernels", "rewrite_graph", "select_kernels"]
