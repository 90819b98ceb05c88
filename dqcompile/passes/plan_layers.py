"""Pass: find the linear layers of the graph and decide, from the spec, how each is quantized."""

from __future__ import annotations

from torch.fx import GraphModule

from torch.fx import Node

from dqcompile.graph import is_linear, is_metadata, linear_nodes
from dqcompile.passes.context import META_KEY, PassContext
from dqcompile.passes.roles import default_float_reasons
from dqcompile.plan import LayerPlan


def _other_uses(gm: GraphModule) -> dict[str, list[Node]]:
    """Parameter name -> the nodes that read it other than as the weight of a linear (a weight tied
    to an embedding, say); metadata reads do not count."""
    uses: dict[str, list[Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            for user in node.users:
                if not (is_linear(user) and user.args[1] is node) and not is_metadata(user):
                    uses.setdefault(node.target, []).append(user)
    return uses


def plan_layers(gm: GraphModule, ctx: PassContext) -> None:
    """Needs: a captured graph (aten.linear nodes whose weights are get_attr nodes).

    Guarantees: ctx.plan.layers holds a LayerPlan for every such linear, named by the weight's
    module path, in graph order: with its WeightPlan and ActivationPlan from the spec (nothing
    rounded or calibrated yet), or with the reason it stays in float; each linear node carries
    node.meta["dqcompile"]["layer"]. Raises ValueError, naming the layer, when the spec cannot apply
    to it (a group size that does not divide its input width, int4 with an odd width). The graph is
    not changed. A weight that the graph also reads otherwise (tied to an embedding) stays in float,
    with that reason: quantizing it would change the other use, or delete what it reads.
    """
    other_uses = _other_uses(gm)
    roles = default_float_reasons(gm, ctx.spec)  # condition / embedding linears by their role in the graph
    for node in linear_nodes(gm):
        weight_name = node.args[1].target
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        bias_name = bias.target if bias is not None and bias.op == "get_attr" else None
        layer_name = weight_name.removesuffix(".weight")
        plan = ctx.plan.layers.get(layer_name)
        if plan is None:
            out_features, in_features = gm.get_parameter(weight_name).shape
            tied = other_uses.get(weight_name)
            reason = (f"weight also read by {', '.join(sorted({str(user.target) for user in tied}))}: kept in float"
                      if tied else ctx.spec.keep_float_reason(layer_name) or roles.get(layer_name))
            plan = LayerPlan(name=layer_name, weight_name=weight_name, bias_name=bias_name,
                             in_features=in_features, out_features=out_features, float_reason=reason)
            if plan.float_reason is None:
                plan.weight, plan.activations = ctx.spec.layer_plans(layer_name, in_features)
                _check_layer_fits(plan)
            ctx.plan.layers[layer_name] = plan
        plan.node_names.append(node.name)
        node.meta.setdefault(META_KEY, {})["layer"] = layer_name


def _check_layer_fits(plan: LayerPlan) -> None:
    for field_name, group in (
        ("weights.group_size", plan.weight.group_size),
        ("activations.group_size", plan.activations.group_size),
    ):
        if group and plan.in_features % group:
            raise ValueError(
                f"layer {plan.name}: {field_name}={group} does not divide its {plan.in_features} input channels"
            )
    if plan.weight.bits == 4 and plan.in_features % 2:
        raise ValueError(
            f"layer {plan.name}: weights.bits=4 packs two columns to a byte and needs an even input "
            f"width, got {plan.in_features}"
        )
