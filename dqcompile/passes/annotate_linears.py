"""Pass: find the linear layers of the graph and decide, from the spec, how each is quantized."""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from dqcompile.passes.context import META_KEY, LayerPlan, PassContext

LINEAR = torch.ops.aten.linear.default


def linear_nodes(gm: GraphModule) -> list[Node]:
    """aten.linear nodes whose weight is a graph attribute (a parameter of the model)."""
    return [
        node
        for node in gm.graph.nodes
        if node.op == "call_function" and node.target == LINEAR and isinstance(node.args[1], Node)
        and node.args[1].op == "get_attr"
    ]


def annotate_linears(gm: GraphModule, ctx: PassContext) -> None:
    """Needs: a captured graph (aten.linear nodes whose weights are get_attr nodes).

    Guarantees: ctx.layers holds a LayerPlan for every such linear, named by the weight's module
    path, with its resolved LayerSpec or the reason it stays in float; each linear node carries
    `node.meta["dqcompile"]["layer"]`. Raises ValueError, naming the layer, when the spec cannot
    apply to it (a group size that does not divide its input width, int4 with an odd width).
    The graph is not changed.
    """
    for node in linear_nodes(gm):
        weight_name = node.args[1].target
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        bias_name = bias.target if isinstance(bias, Node) and bias.op == "get_attr" else None
        layer_name = weight_name.removesuffix(".weight")
        plan = ctx.layers.get(layer_name)
        if plan is None:
            out_features, in_features = gm.get_parameter(weight_name).shape
            reason = ctx.spec.keep_float_reason(layer_name)
            spec = None if reason else ctx.spec.layer(layer_name, in_features)
            plan = LayerPlan(
                name=layer_name,
                weight_name=weight_name,
                bias_name=bias_name,
                in_features=in_features,
                out_features=out_features,
                spec=spec,
                float_reason=reason,
            )
            if spec is not None:
                _check_layer_fits(plan)
            ctx.layers[layer_name] = plan
        plan.node_names.append(node.name)
        node.meta.setdefault(META_KEY, {})["layer"] = layer_name


def _check_layer_fits(plan: LayerPlan) -> None:
    spec = plan.spec
    for field_name, group in (
        ("weights.group_size", spec.weight_group_size),
        ("activations.group_size", spec.act_group_size),
    ):
        if group and plan.in_features % group:
            raise ValueError(
                f"layer {plan.name}: {field_name}={group} does not divide its {plan.in_features} input channels"
            )
    if spec.weight_bits == 4 and plan.in_features % 2:
        raise ValueError(
            f"layer {plan.name}: weights.bits=4 packs two columns to a byte and needs an even input "
            f"width, got {plan.in_features}"
        )
