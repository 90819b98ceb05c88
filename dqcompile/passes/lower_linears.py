"""Pass: each quantized aten.linear becomes dqcompile integer ops."""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

import dqcompile.backends.ops  # noqa: F401  (registers torch.ops.dqcompile)
from dqcompile.passes.context import META_KEY, LayerPlan, PassContext

OPS = torch.ops.dqcompile


def lower_linears(gm: GraphModule, ctx: PassContext) -> None:
    """Needs: quantize_weights (and static_activation_params for static layers).

    Guarantees: every linear node of a quantized layer is replaced by
    - dynamic activations: quantize_act (quantize_act_per_sample for dynamic_sample_group) -> int_linear,
    - static activations: quantize_act_static -> int_linear,
    - float activations (16 bits): weight_only_linear,
    reading the layer's integer buffers; the new nodes keep the linear's module path and carry
    `meta["dqcompile"]["layer"]`. The float weights of quantized layers are deleted from the module,
    so the model really holds integer weights.
    """
    graph = gm.graph
    for node in list(graph.nodes):
        layer = node.meta.get(META_KEY, {}).get("layer")
        plan = ctx.layers.get(layer) if layer else None
        if plan is None or not plan.quantized or node.op != "call_function":
            continue
        with graph.inserting_before(node):
            replacement = _lowered(gm, node, plan)
        node.replace_all_uses_with(replacement)
        graph.erase_node(node)
    graph.eliminate_dead_code()
    for plan in ctx.quantized_layers():
        owner = gm.get_submodule(plan.name)
        owner._parameters.pop("weight", None)
    gm.recompile()


def _lowered(gm: GraphModule, linear: Node, plan: LayerPlan) -> Node:
    graph = gm.graph
    spec = plan.spec
    x = linear.args[0]
    bias = linear.args[2] if len(linear.args) > 2 else linear.kwargs.get("bias")
    out_dtype = linear.meta["val"].dtype
    qweight = graph.get_attr(f"{plan.name}.qweight")
    weight_scale = graph.get_attr(f"{plan.name}.weight_scale")
    new_nodes: list[Node] = [qweight, weight_scale]
    if not spec.act_quantized:
        output = graph.call_function(
            OPS.weight_only_linear.default,
            (x, qweight, weight_scale, bias, spec.weight_bits, spec.weight_group_size),
        )
        new_nodes.append(output)
    else:
        if spec.act_mode == "static_tensor":
            scale = graph.get_attr(f"{plan.name}.input_scale")
            zero = graph.get_attr(f"{plan.name}.input_zero")
            qx = graph.call_function(OPS.quantize_act_static.default, (x, scale, zero, spec.act_bits))
            new_nodes += [scale, zero, qx]
        else:
            dynamic = OPS.quantize_act_per_sample if spec.act_mode == "dynamic_sample_group" else OPS.quantize_act
            quantized = graph.call_function(
                dynamic.default, (x, spec.act_bits, spec.act_group_size, spec.act_symmetric)
            )
            qx, scale, zero = (graph.call_function(operator.getitem, (quantized, i)) for i in range(3))
            new_nodes += [quantized, qx, scale, zero]
        # One group size serves both operands: the spec only lets them differ when one is 0 (no groups),
        # and a per-token or per-channel scale broadcasts over the other's groups.
        group_size = spec.weight_group_size or spec.act_group_size
        output = graph.call_function(
            OPS.int_linear.default,
            (qx, scale, zero, qweight, weight_scale, bias, spec.weight_bits, group_size, out_dtype),
        )
        new_nodes.append(output)
    for new in new_nodes:
        new.meta["nn_module_stack"] = linear.meta.get("nn_module_stack", {})
        new.meta[META_KEY] = {"layer": plan.name}
    output.meta["val"] = linear.meta["val"]
    return output
