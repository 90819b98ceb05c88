"""The `torch.compile` backend "dqcompile": fuse activation quantization, pick kernels, hand over to Inductor.

    import dqcompile                      # registers the backend
    compiled = torch.compile(qmodel, backend="dqcompile")                                    # kernels "auto"
    compiled = torch.compile(qmodel, backend="dqcompile", options={"kernels": "reference"})
    compiled = torch.compile(qmodel, backend=make_backend(kernels="triton"))                # same, as a callable

What it does with the FX graph dynamo captured (a QuantizedModel's forward: ATen ops plus the
`torch.ops.dqcompile.*` custom ops, which dynamo keeps as single opaque nodes, so there is no graph break):
1. fusion (`dqcompile.backends.fusion`, option "fuse", default True): each `quantize_act` of a modulated
   LayerNorm becomes one `ln_modulate_quantize` shared by the linears that read it, each `quantize_act`
   of a GELU one `gelu_quantize`;
2. merge (`dqcompile.backends.merge`, option "merge", default True): linears that read the same codes
   (q, k and v) run as one GEMM over their weights, which the lowering stores as consecutive row
   blocks of one tensor (no copy), and each layer reads a column slice of its output;
3. kernel selection (`select_kernels`): every dqcompile node whose op has a kernel in the chosen
   backend's column of the op table (`dqcompile.backends.ops`) is re-targeted to it: an op
   `torch.ops.dqcompile.<op>_<backend>` with the same schema and fake (a custom op, or a `triton_op` whose
   Triton launches Inductor inlines), or a decomposition into ATen ops that Inductor compiles and fuses
   with its neighbours. Ops without a kernel there keep the reference. Independently of the backend,
   `int_linear` gets x_zero None after a symmetric quantizer and the weight's code sums as w_sum where
   the lowering did not pass them;
4. Inductor (`torch._inductor.compile_fx.compile_fx`, with `mode`'s options, "reduce-overhead" included)
   compiles the rest: opaque dqcompile ops stay extern kernel calls, everything between them (residuals,
   attention, GELU, embeddings) and the decompositions are Inductor's. torch analyses each Triton launch
   it meets; `dqcompile.backends.kernel_analysis` makes that once per distinct launch, not per call site.

Options (`torch.compile(..., options={...})`, which dynamo passes to a registered backend as `options`):
    kernels: "auto" (default: "triton" when the quantized tensors are on CUDA and Triton is installed,
             "aten" on CPU), "reference", or a backend name ("triton", "aten", or any module's that
             registered kernels);
    fuse:    True (default) or False;
    merge:   True (default) or False;
    any other key is an Inductor config option, as with backend="inductor" (e.g. "max_autotune");
    `mode=` ("max-autotune", "reduce-overhead", ...) is Inductor's mode, as with backend="inductor".

Why twins rather than kernels registered for a dispatch key of the same ops: the choice is per compiled
graph (an option of this backend), not a process-wide switch, and eager calls of `torch.ops.dqcompile.*`
keep meaning the reference.

Numerics: opaque kernels match the reference as the op table's contract says (docs/CONTRACTS.md);
decompositions compiled by Inductor match it within the output dtype's rounding (Inductor may reorder or
contract float operations, which can also move an activation code by one step).

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
from torch.fx import GraphModule, Node

from dqcompile.backends import load_backend, reference
from dqcompile.backends.fusion import fuse_quantizers, node_value
from dqcompile.backends.kernel_analysis import memoized_kernel_analysis
from dqcompile.backends.merge import merge_sibling_linears
from dqcompile.backends.ops import NAMESPACE, bind_arguments, kernel, op_def_of, positional_arguments

log = logging.getLogger(__name__)

BACKEND_NAME = "dqcompile"
SPECIAL_KERNEL_CHOICES = ("auto", "reference")


@dataclass
class RewriteSummary:
    """What the backend did to one graph: the kernel backend used and how many nodes each step rewrote."""

    kernels: str
    fused: dict[str, int] = field(default_factory=dict)
    merged_linears: int = 0
    retargeted: dict[str, int] = field(default_factory=dict)
    w_sums: int = 0
    symmetric_linears: int = 0


# ------------------------------------------------------------------------------------------ kernel choice

def _dqcompile_nodes(gm: GraphModule) -> list[Node]:
    return [node for node in gm.graph.nodes
            if node.op == "call_function" and getattr(node.target, "namespace", None) == NAMESPACE]


def _triton_runs_on(device: torch.device) -> bool:
    """Triton kernels take CUDA tensors, and CPU tensors only under the interpreter (TRITON_INTERPRET=1)."""
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1")


def _check_kernels(kernels: str) -> None:
    if kernels in SPECIAL_KERNEL_CHOICES:
        return
    try:
        load_backend(kernels)
    except ValueError as error:
        raise ValueError(f"dqcompile backend: kernels={kernels!r} is not 'auto', 'reference' or an available "
                         f"backend ({error})") from None


def resolve_kernels(gm: GraphModule, kernels: str) -> str:
    """The kernel backend for `gm`: `kernels` itself, or for "auto" "triton" where it can run (CUDA tensors,
    the `triton` package), else "aten" for CPU tensors, else "reference".

    Raises ValueError for an unknown choice, or for "triton" with tensors Triton cannot take.
    """
    _check_kernels(kernels)
    from dqcompile.backends import triton as triton_kernels

    devices = {value.device for node in _dqcompile_nodes(gm) if (value := node_value(node.args[0])) is not None}
    if kernels == "auto":
        if devices and triton_kernels.is_available() and all(d.type == "cuda" for d in devices):
            kernels = "triton"
        elif devices and all(d.type == "cpu" for d in devices):
            kernels = "aten"
        else:
            kernels = "reference"
        return load_backend(kernels)
    if kernels == "triton":
        if not triton_kernels.is_available():
            raise ValueError("dqcompile backend: kernels='triton' needs the `triton` package; use 'reference'")
        for device in devices:
            if not _triton_runs_on(device):
                raise ValueError(f"dqcompile backend: kernels='triton' needs CUDA tensors, the quantized model is on "
                                 f"{device} (CPU runs Triton only under TRITON_INTERPRET=1); use 'reference' or 'aten'")
    return kernels


# ------------------------------------------------------------------------------------------ int_linear inputs

def _has_zero_points(x_zero: object) -> bool:
    """False when `x_zero` is None or the zero points of a quantizer called with symmetric=True (all 0)."""
    if x_zero is None:
        return False
    if not isinstance(x_zero, Node) or x_zero.op != "call_function" or x_zero.target != operator.getitem:
        return True
    producer, index = x_zero.args
    definition = op_def_of(getattr(producer, "target", None))
    if definition is None or "symmetric" not in definition.argument_names:
        return True
    returns = [r.name for r in definition.parsed_schema.returns]
    if returns[index] != "zero":
        return True
    return bind_arguments(definition.name, producer.args, producer.kwargs)["symmetric"] is not True


def prepare_int_linears(gm: GraphModule) -> tuple[int, int]:
    """Needs: a graph with `int_linear` nodes (after the fusion, if any).

    Guarantees: an `int_linear` whose x_zero are the zero points of a symmetric quantizer gets x_zero None
    (no zero-point term: bit-identical, the term is 0); one that keeps x_zero and has no w_sum gets a
    `weight_group_sums` node of its weight (one per weight, computed in the graph) as w_sum. Returns
    (linears made symmetric, w_sum nodes inserted).
    """
    graph = gm.graph
    symmetric = inserted = 0
    weight_sums: dict[Node, Node] = {}
    for node in list(graph.nodes):
        definition = op_def_of(node.target) if node.op == "call_function" else None
        if definition is None or definition.name != "int_linear":
            continue
        args = bind_arguments("int_linear", node.args, node.kwargs)
        if args["x_zero"] is not None and not _has_zero_points(args["x_zero"]):
            args["x_zero"] = None
            symmetric += 1
        if args["x_zero"] is not None and args["w_sum"] is None:
            qw = args["qw"]
            if qw not in weight_sums:  # nodes come in graph order: this is the weight's first linear
                with graph.inserting_before(node):
                    # A plain function node: AOTAutograd traces it into ATen ops that Inductor compiles.
                    weight_sums[qw] = graph.call_function(reference.weight_group_sums,
                                                           (qw, args["w_bits"], args["group_size"]))
                inserted += 1
            args["w_sum"] = weight_sums[qw]
        node.args, node.kwargs = positional_arguments("int_linear", args), {}
    graph.lint()
    gm.recompile()
    return symmetric, inserted


# ------------------------------------------------------------------------------------------ kernel selection

def select_kernels(gm: GraphModule, kernels: str) -> dict[str, int]:
    """Needs: a graph with dqcompile ops and `kernels` resolved (see `resolve_kernels`).

    Guarantees: every node of a dqcompile op whose `kernels` column holds a kernel that accepts the call
    (`Kernel.accepts`, read from the node's arguments by name) now calls that kernel's target, with the
    same arguments in schema order; the others keep the reference op. Returns how many nodes of each op
    were re-targeted.
    """
    if kernels == "reference":
        return {}
    counts: dict[str, int] = {}
    graph = gm.graph
    for node in list(graph.nodes):
        definition = op_def_of(node.target) if node.op == "call_function" else None
        if definition is None or node.target != definition.overload:
            continue
        chosen = kernel(kernels, definition.name)
        if chosen is None:
            continue
        args = bind_arguments(definition.name, node.args, node.kwargs)
        if not chosen.takes(args):
            continue
        node.target = chosen.target
        node.args, node.kwargs = positional_arguments(definition.name, args), {}
        name = f"{NAMESPACE}::{definition.name}"
        counts[name] = counts.get(name, 0) + 1
    graph.lint()
    gm.recompile()
    return counts


# ------------------------------------------------------------------------------------------ the backend

def rewrite_graph(gm: GraphModule, *, kernels: str = "auto", fuse: bool = True, merge: bool = True,
                  example_inputs: list | None = None) -> RewriteSummary:
    """The backend's own passes on a dynamo graph, in place: fusion, sibling GEMMs merged, int_linear
    inputs, kernel selection. `example_inputs`: the real tensors of the graph's placeholders (a dynamo
    backend's second argument), which the merge reads the weights from."""
    summary = RewriteSummary(kernels=resolve_kernels(gm, kernels))
    if fuse:
        # The Triton GELU's erf is aten's only up to float32 rounding (see fuse_gelu_quantize).
        summary.fused = fuse_quantizers(gm, float32_erf=summary.kernels != "triton")
    if merge:
        summary.merged_linears = merge_sibling_linears(gm, example_inputs)
    summary.symmetric_linears, summary.w_sums = prepare_int_linears(gm)
    summary.retargeted = select_kernels(gm, summary.kernels)
    log.info("dqcompile backend: kernels=%s, fused %s, %d merged GEMMs, %d symmetric linears, %d weight sums, "
             "re-targeted %s", summary.kernels, summary.fused or "nothing", summary.merged_linears,
             summary.symmetric_linears, summary.w_sums,
             summary.retargeted or "nothing")
    return summary


def make_backend(kernels: str = "auto", *, fuse: bool = True, merge: bool = True, mode: str | None = None,
                 inductor_options: dict[str, Any] | None = None) -> Callable[[GraphModule, list], Callable]:
    """A torch.compile backend (a callable) with these options; `backend="dqcompile"` builds the same one.

    kernels: "auto", "reference" or a backend name (see the module docstring); fuse: apply the fusion;
    merge: run sibling linears (q, k, v) as one GEMM;
    mode / inductor_options: Inductor's mode and config options, as torch.compile takes them for Inductor.
    """
    _check_kernels(kernels)
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    config_patches = {**(list_mode_options(mode) if mode else {}), **(inductor_options or {})}

    def dqcompile_backend(gm: GraphModule, example_inputs: list) -> Callable:
        rewrite_graph(gm, kernels=kernels, fuse=fuse, merge=merge, example_inputs=example_inputs)
        with memoized_kernel_analysis():  # one Triton-IR analysis per distinct launch, not per call site
            return compile_fx(gm, example_inputs, config_patches=config_patches or None)

    return dqcompile_backend


def _registered_backend(gm: GraphModule, example_inputs: list, *, options: dict[str, Any] | None = None,
                        mode: str | None = None) -> Callable:
    """The backend behind the name "dqcompile": torch.compile passes `options` and `mode` here."""
    options = dict(options or {})
    kernels = options.pop("kernels", "auto")
    fuse = options.pop("fuse", True)
    merge = options.pop("merge", True)
    return make_backend(kernels, fuse=fuse, merge=merge, mode=mode, inductor_options=options)(gm, example_inputs)


def register_backend() -> None:
    """Register `_registered_backend` as torch.compile's backend "dqcompile" (once; later calls do nothing)."""
    from torch._dynamo import list_backends
    from torch._dynamo import register_backend as dynamo_register_backend

    if BACKEND_NAME not in list_backends(exclude_tags=()):
        dynamo_register_backend(_registered_backend, name=BACKEND_NAME)


__all__ = ["BACKEND_NAME", "RewriteSummary", "make_backend", "prepare_int_linears", "register_backend",
           "resolve_kernels", "rewrite_graph", "select_kernels"]
