"""Compile-time fusion of dynamic activation quantization into the op that produces its input.

Two patterns, matched on the ATen graph the compile backend receives from dynamo (a QuantizedModel's
forward runs an ATen graph):

    h = layer_norm(x) * (1 + scale) + shift          # the adaLN input of q, k, v and fc1
    q_i, s_i, z_i = quantize_act(h, bits, g, sym)    # one per consuming linear, reads h again
  -> ln_modulate_quantize(x, ln_weight, ln_bias, eps, scale, shift, bits, g, sym)

    h = gelu(x, approximate)                          # the fc2 input
    q, s, z = quantize_act(h, bits, g, sym)
  -> gelu_quantize(x, approximate, bits, g, sym)

Each fused node is shared by all consumers that quantize `h` with the same parameters (q, k and v then
read one set of codes instead of quantizing the same tensor three times). The float `h` is no longer
computed unless something else (a float linear) still reads it. `aten.mul` / `aten.add` are matched with
either operand order, `1 + scale` either way round.

The fused ops are ops of the table (`dqcompile.backends.ops`); each backend then picks per op how to run
them (its kernel column): a fused kernel (Triton), or a decomposition into ATen ops that Inductor fuses
into one loop with the producer (CPU), or the reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

from dqcompile.backends.ops import bind_arguments

OPS = torch.ops.dqcompile
ATEN = torch.ops.aten
LAYER_NORM = ATEN.layer_norm.default
MUL = ATEN.mul.Tensor
ADD = ATEN.add.Tensor
QUANTIZE_ACT = OPS.quantize_act.default
LN_MODULATE_QUANTIZE = OPS.ln_modulate_quantize.default
GELU = ATEN.gelu.default
GELU_QUANTIZE = OPS.gelu_quantize.default


@dataclass(frozen=True)
class ModulatedLayerNorm:
    """The nodes of `h = layer_norm(x, [C], weight, bias, eps) * (1 + scale) + shift`."""

    x: Node
    ln_weight: Node | None
    ln_bias: Node | None
    eps: float
    scale: Node
    shift: Node
    intermediates: tuple[Node, ...]  # h, the product, 1 + scale, layer_norm: erased when left unused


def node_value(node: Node) -> torch.Tensor | None:
    """The (fake) tensor a node computes, as recorded by dynamo (`example_value`) or export (`val`)."""
    value = node.meta.get("example_value", node.meta.get("val"))
    return value if isinstance(value, torch.Tensor) else None


def _same_shape(a: Node, b: Node) -> bool:
    va, vb = node_value(a), node_value(b)
    if va is None or vb is None or va.dim() != vb.dim():
        return False
    return all(statically_known_true(x == y) for x, y in zip(va.shape, vb.shape))


def _binary_operands(node: Node, target: object) -> tuple[object, object] | None:
    """(a, b) of `target(a, b)` with no other arguments (an `alpha` would change the meaning)."""
    if node.op != "call_function" or node.target != target or len(node.args) != 2 or node.kwargs:
        return None
    return node.args[0], node.args[1]


def _one_plus(node: object) -> Node | None:
    """`s` when `node` computes `s + 1` or `1 + s`."""
    if not isinstance(node, Node):
        return None
    operands = _binary_operands(node, ADD)
    if operands is None:
        return None
    for value, one in (operands, operands[::-1]):
        if isinstance(value, Node) and not isinstance(one, Node) and one == 1:
            return value
    return None


def _last_dim_layer_norm(node: object) -> tuple[Node, Node | None, Node | None, float] | None:
    """(x, weight, bias, eps) of a 3-d `aten.layer_norm` over the last dim."""
    if not isinstance(node, Node) or node.op != "call_function" or node.target != LAYER_NORM or node.kwargs:
        return None
    # aten.layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-05, cudnn_enable=True)
    x, normalized_shape, weight, bias, eps = (list(node.args) + [None, None, 1e-5][len(node.args) - 2:])[:5]
    if len(normalized_shape) != 1 or node_value(x) is None or node_value(x).dim() != 3:
        return None
    return x, weight, bias, float(eps)


def match_modulated_layer_norm(h: Node) -> ModulatedLayerNorm | None:
    """The pattern rooted at `h`, or None; `h` must keep the shape of the LayerNorm's input."""
    operands = _binary_operands(h, ADD)
    if operands is None:
        return None
    for product, shift in (operands, operands[::-1]):
        if not isinstance(product, Node) or not isinstance(shift, Node):
            continue
        factors = _binary_operands(product, MUL)
        if factors is None:
            continue
        for normalized, one_plus_scale in (factors, factors[::-1]):
            layer_norm = _last_dim_layer_norm(normalized)
            scale = _one_plus(one_plus_scale)
            if layer_norm is None or scale is None:
                continue
            x, weight, bias, eps = layer_norm
            if not _same_shape(h, x):
                return None
            return ModulatedLayerNorm(
                x=x, ln_weight=weight, ln_bias=bias, eps=eps, scale=scale, shift=shift,
                intermediates=(h, product, one_plus_scale, normalized),
            )
    return None


def fuse_ln_modulate_quantize(gm: GraphModule) -> int:
    """Needs: an FX graph of ATen ops holding `dqcompile.quantize_act` calls (a QuantizedModel's graph as
    dynamo hands it to a backend). Nodes should carry `example_value` or `val` metadata (shapes).

    Guarantees: every `quantize_act(h, bits, g, sym)` whose input is a modulated LayerNorm (see the
    module docstring) is replaced by one `ln_modulate_quantize` node per distinct (h, bits, g, sym),
    whose outputs take the place of the quantizers' outputs; LayerNorm / modulation nodes left without
    users are erased. Other nodes are untouched. Returns the number of fused nodes inserted; the graph
    lints and is recompiled.
    """
    graph = gm.graph
    fused = 0
    for h in list(graph.nodes):
        by_params = _dynamic_quantizers_of(h)
        if not by_params:
            continue
        pattern = match_modulated_layer_norm(h)
        if pattern is None:
            continue
        for (bits, group_size, symmetric), group in by_params.items():
            # Every argument of the fused node precedes h, and every quantizer follows it.
            with graph.inserting_after(h):
                fused_node = graph.call_function(
                    LN_MODULATE_QUANTIZE,
                    (pattern.x, pattern.ln_weight, pattern.ln_bias, pattern.eps, pattern.scale, pattern.shift,
                     bits, group_size, symmetric),
                )
            fused_node.meta.update({key: group[0].meta[key] for key in ("example_value", "val") if key in group[0].meta})
            for quantizer in group:
                quantizer.replace_all_uses_with(fused_node)
                graph.erase_node(quantizer)
            fused += 1
        for node in pattern.intermediates:
            if not node.users:
                graph.erase_node(node)
    graph.lint()
    gm.recompile()
    return fused


def _dynamic_quantizers_of(h: Node) -> dict[tuple, list[Node]]:
    """The `quantize_act` nodes reading `h` as their input, grouped by (bits, group_size, symmetric)."""
    groups: dict[tuple, list[Node]] = {}
    for user in h.users:
        if user.op != "call_function" or user.target != QUANTIZE_ACT:
            continue
        args = bind_arguments("quantize_act", user.args, user.kwargs)
        if args["x"] is h:
            groups.setdefault((args["bits"], args["group_size"], args["symmetric"]), []).append(user)
    return groups


def _gelu_operands(node: Node) -> tuple[Node, str] | None:
    """(x, approximate) of `aten.gelu(x, approximate=...)`."""
    if node.op != "call_function" or node.target != GELU:
        return None
    x = node.args[0]
    approximate = node.args[1] if len(node.args) > 1 else node.kwargs.get("approximate", "none")
    if not isinstance(x, Node) or not isinstance(approximate, str):
        return None
    return x, approximate


def _identity_input(node: Node) -> Node | None:
    """`x` when `node` returns its input unchanged: dropout in eval mode, clone, alias, detach."""
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], Node):
        return None
    if node.target in (ATEN.clone.default, ATEN.alias.default, ATEN.detach.default):
        return node.args[0]
    if node.target == ATEN.dropout.default:
        train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train")
        return node.args[0] if train is False else None
    return None


def fuse_gelu_quantize(gm: GraphModule, *, float32_erf: bool = True) -> int:
    """Needs: an FX graph of ATen ops holding `dqcompile.quantize_act` calls.

    Guarantees: every `quantize_act(gelu(x, approximate), bits, g, sym)`, with or without an eval-mode
    dropout (or clone) between the two, is replaced by one `gelu_quantize(x, approximate, bits, g, sym)`
    per distinct (input, bits, g, sym); the GELU and dropout nodes are erased when nothing else reads them.
    The reference `gelu_quantize` is the same composition, so the rewritten graph computes bit-identical
    outputs. With `float32_erf=False` the erf GELU of a float32 x stays unfused: the Triton kernel's erf is
    not aten's bit for bit, and in float32 (no rounding to a narrower dtype to absorb it) that moved a few
    codes (4-10 of 18.9M on an H200) and, per group, scales. Returns the number of fused nodes inserted; the
    graph lints and is recompiled.
    """
    graph = gm.graph
    fused = 0
    for h in list(graph.nodes):
        # h is the quantizers' input: the GELU itself, or an identity of it (eval-mode dropout).
        chain = [h]
        while (inner := _identity_input(chain[-1])) is not None:
            chain.append(inner)
        operands = _gelu_operands(chain[-1])
        if operands is None:
            continue
        x, approximate = operands
        value = node_value(x)
        if not float32_erf and approximate == "none" and getattr(value, "dtype", None) == torch.float32:
            continue
        for (bits, group_size, symmetric), group in _dynamic_quantizers_of(h).items():
            with graph.inserting_after(h):
                fused_node = graph.call_function(GELU_QUANTIZE, (x, approximate, bits, group_size, symmetric))
            fused_node.meta.update({key: group[0].meta[key] for key in ("example_value", "val") if key in group[0].meta})
            for quantizer in group:
                quantizer.replace_all_uses_with(fused_node)
                graph.erase_node(quantizer)
            fused += 1
        for node in chain:
            if not node.users:
                graph.erase_node(node)
    graph.lint()
    gm.recompile()
    return fused


def fuse_quantizers(gm: GraphModule, *, float32_erf: bool = True) -> dict[str, int]:
    """Both fusions of this module, in place; returns how many nodes of each fused op were inserted.
    `float32_erf`: as in `fuse_gelu_quantize` (False for kernels that are not bit-exact there)."""
    counts = {"ln_modulate_quantize": fuse_ln_modulate_quantize(gm),
              "gelu_quantize": fuse_gelu_quantize(gm, float32_erf=float32_erf)}
    return {name: count for name, count in counts.items() if count}
