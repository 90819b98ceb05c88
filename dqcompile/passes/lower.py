"""The one lowering pass: each quantized layer's and attention's ops, emitted once from its plan.

Everything a method decided is in the ModelPlan; this pass reads nothing else. One rule per
activation quantizer kind (`_LINEAR_RULES`) turns a quantized aten.linear into dqcompile ops:

    float (weight-only)      weight_only_linear(x, qw, w_scale, bias)
    dynamic_token / _group   q, s, z = quantize_act(x, bits, g, sym);       int_linear(q, s, z or None, qw, ...)
    dynamic_sample_group     q, s, z = quantize_act_per_sample(x, ...);     int_linear(q, s, z or None, qw, ...)
    static                   q = quantize_act_static(x, s, z, bits);        int_linear(q, s, z, qw, ...)
    two_region (post-GELU)   q_lo, q_hi = quantize_act_mrq(x, lo, hi, bits, True)
                             int_linear(q_lo, lo, None, qw, ...) + int_linear(q_hi, hi, None, qw, ..., bias)

A time-grouped quantizer reads its scales at each row's time group: bucketize(timestep, boundaries)
once per graph, then index_select on the [G] tables. Attention plans replace
scaled_dot_product_attention by int_attention with per-head, per-time-group scales.

Every new node carries node.meta["dqcompile"] = {"layer" or "attention": name, "plan": its plan},
which the report and the graph view read instead of decoding op arguments.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
from torch import nn
from torch.fx import GraphModule, Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

import dqcompile.backends.ops  # noqa: F401  (registers torch.ops.dqcompile)
from dqcompile.backends.merge import pack_sibling_weights
from dqcompile.calib.runner import TIMESTEP_ARGUMENTS
from dqcompile.graph import through_transparent
from dqcompile.passes.context import META_KEY
from dqcompile.plan import DYNAMIC_KINDS, AttentionPlan, GraphEdit, LayerPlan, ModelPlan, attention_path, plan_meta
from dqcompile.quant.weights import weight_group_sums

OPS = torch.ops.dqcompile
aten = torch.ops.aten
# Buffers the lowering derives from the plan (not part of it, not saved): per-group weight code sums.
DERIVED_META = "dqcompile_derived_buffers"


class _Emitter:
    """Adds nodes before an anchor node, tagging each with the anchor's module path and a plan."""

    def __init__(self, gm: GraphModule, anchor: Node, meta: dict) -> None:
        self.gm, self.graph, self.anchor, self.meta = gm, gm.graph, anchor, meta

    def _tag(self, node: Node) -> Node:
        node.meta["nn_module_stack"] = self.anchor.meta.get("nn_module_stack", {})
        node.meta[META_KEY] = self.meta
        return node

    def call(self, target: Callable, *args: object, **kwargs: object) -> Node:
        with self.graph.inserting_before(self.anchor):
            return self._tag(self.graph.call_function(target, args, kwargs))

    def attr(self, path: str) -> Node:
        with self.graph.inserting_before(self.anchor):
            return self._tag(self.graph.get_attr(path))

    def outputs(self, node: Node, count: int) -> list[Node]:
        return [self.call(operator.getitem, node, i) for i in range(count)]


def _register(gm: GraphModule, path: str, tensor: torch.Tensor, persistent: bool = True) -> None:
    owner_path, _, leaf = path.rpartition(".")
    if owner_path:
        try:
            owner = gm.get_submodule(owner_path)
        except AttributeError:
            owner = nn.Module()
            gm.add_submodule(owner_path, owner)
    else:
        owner = gm
    owner.register_buffer(leaf, tensor, persistent=persistent)


def _graph_device(gm: GraphModule) -> torch.device:
    for tensor in (*gm.parameters(), *gm.buffers()):
        return tensor.device
    return torch.device("cpu")


# ------------------------------------------------------------------------------------------ time groups

def _timestep_placeholder(gm: GraphModule) -> Node | None:
    """The graph input holding the timestep: the first named as in TIMESTEP_ARGUMENTS, as calibration
    keys its samples."""
    placeholders = {node.target: node for node in gm.graph.nodes if node.op == "placeholder"}
    return next((placeholders[name] for name in TIMESTEP_ARGUMENTS if name in placeholders), None)


def _time_group_index(gm: GraphModule) -> tuple[Node, Node] | None:
    """(index, timestep): the node computing each row's time group, int64 [B], from the timestep input.

    bucketize(float(timestep), boundaries) is a tensor op: torch.compile traces it once for every
    timestep value, where a Python int would specialise the graph on each one. None when the graph
    has no timestep input: every call then uses group 0.
    """
    timestep = _timestep_placeholder(gm)
    if timestep is None:
        return None
    graph = gm.graph
    last_placeholder = [node for node in graph.nodes if node.op == "placeholder"][-1]
    with graph.inserting_after(last_placeholder):
        flat = graph.call_function(aten.reshape.default, (timestep, [-1]))
    with graph.inserting_after(flat):
        as_float = graph.call_function(aten._to_copy.default, (flat,), {"dtype": torch.float32})
    with graph.inserting_after(as_float):
        bounds = graph.get_attr("time_boundaries")
    with graph.inserting_after(bounds):
        index = graph.call_function(aten.bucketize.Tensor, (as_float, bounds))
    for node in (flat, as_float, bounds, index):
        node.meta[META_KEY] = {"time_groups": True}
    return index, timestep


def _same_batch(value: Node, timestep: Node) -> bool:
    """Whether dim 0 of `value` is provably the timestep's batch dim (both from export's shape env)."""
    a, t = value.meta.get("val"), timestep.meta.get("val")
    if a is None or t is None or a.dim() == 0 or t.dim() != 1:
        return False
    return bool(statically_known_true(a.shape[0] == t.shape[0]))


def _per_group(emit: _Emitter, table: str, groups: tuple[Node, Node] | None, like: Node,
               trailing: list[int]) -> Node:
    """Buffer `table` ([G, *trailing] or [G]) read at each row's time group, shaped [B, *trailing, 1, ...]
    to broadcast against `like` (the activation it scales).

    Per row when `like`'s dim 0 is the timestep's batch dim (rows of one batch may sit at different
    timesteps); otherwise the first row's group serves the whole call; group 0 without a timestep input.
    """
    ndim = like.meta["val"].dim()
    tail = [*trailing, *[1] * (ndim - 1 - len(trailing))]
    table_node = emit.attr(table)
    if groups is None:
        picked = emit.call(aten.slice.Tensor, table_node, 0, 0, 1)
        return emit.call(aten.view.default, picked, [1, *tail])
    index, timestep = groups
    if not _same_batch(like, timestep):
        index = emit.call(aten.slice.Tensor, index, 0, 0, 1)
    picked = emit.call(aten.index_select.default, table_node, 0, index)
    return emit.call(aten.view.default, picked, [-1, *tail])


# ------------------------------------------------------------------------------------------ linears

def _activation_tensor(emit: _Emitter, plan: LayerPlan, name: str, groups: tuple[Node, Node] | None,
                       x: Node) -> Node:
    path = plan.tensor_path(f"input_{name}")
    return _per_group(emit, path, groups, x, []) if plan.activations.time_grouped else emit.attr(path)


def _weight_args(emit: _Emitter, plan: LayerPlan) -> tuple[Node, Node]:
    return emit.attr(plan.tensor_path("qweight")), emit.attr(plan.tensor_path("weight_scale"))


def _float_activations(emit: _Emitter, plan: LayerPlan, x: Node, bias: Node | None, out_dtype: torch.dtype,
                       groups: tuple[Node, Node] | None) -> Node:
    qweight, scale = _weight_args(emit, plan)
    return emit.call(OPS.weight_only_linear.default, x, qweight, scale, bias, plan.weight.bits, plan.weight.group_size)


def _int_linear(emit: _Emitter, plan: LayerPlan, qx: Node, x_scale: Node, x_zero: Node | None, bias: Node | None,
                out_dtype: torch.dtype) -> Node:
    """int_linear on codes `qx`; the weight's code sums are passed where the zero-point term needs them
    (x_zero None: no zero-point term)."""
    qweight, scale = _weight_args(emit, plan)
    w_sum = emit.attr(plan.tensor_path("weight_sum")) if x_zero is not None else None
    # One group size serves both operands: the spec only lets them differ when one is 0 (no groups),
    # and a per-token or per-channel scale broadcasts over the other's groups.
    group_size = plan.weight.group_size or plan.activations.group_size
    return emit.call(OPS.int_linear.default, qx, x_scale, x_zero, qweight, scale, bias, plan.weight.bits,
                     group_size, out_dtype, w_sum)


def _dynamic(emit: _Emitter, plan: LayerPlan, x: Node, bias: Node | None, out_dtype: torch.dtype,
             groups: tuple[Node, Node] | None) -> Node:
    act = plan.activations
    op = OPS.quantize_act_per_sample if act.kind == "dynamic_sample_group" else OPS.quantize_act
    qx, scale, zero = emit.outputs(emit.call(op.default, x, act.bits, act.group_size, act.symmetric), 3)
    return _int_linear(emit, plan, qx, scale, None if act.symmetric else zero, bias, out_dtype)


def _nonfinite_guard(emit: _Emitter, x: Node, scale: Node, dims: list[int]) -> Node:
    """scale + 0 * max|x| over `dims`: the scale itself for every finite row (adding +0 changes no
    bit), NaN for a row holding NaN or inf. A static quantizer's codes cannot carry a NaN (it would
    round to a code like any number), so the scale it hands the integer product carries it instead,
    and a non-finite input gives a non-finite output row, as the float model's does."""
    magnitude = emit.call(aten.amax.default, emit.call(aten.abs.default, x), dims, True)
    return emit.call(aten.add.Tensor, scale, emit.call(aten.mul.Tensor, magnitude, 0.0))


def _static(emit: _Emitter, plan: LayerPlan, x: Node, bias: Node | None, out_dtype: torch.dtype,
            groups: tuple[Node, Node] | None) -> Node:
    scale = _activation_tensor(emit, plan, "scale", groups, x)
    zero = _activation_tensor(emit, plan, "zero", groups, x)
    qx = emit.call(OPS.quantize_act_static.default, x, scale, zero, plan.activations.bits)
    return _int_linear(emit, plan, qx, _nonfinite_guard(emit, x, scale, [-1]), zero, bias, out_dtype)


def _two_region(emit: _Emitter, plan: LayerPlan, x: Node, bias: Node | None, out_dtype: torch.dtype,
                groups: tuple[Node, Node] | None) -> Node:
    """Post-GELU MRQ: every element is non-zero in at most one code tensor, so the two exact integer
    products, each with its region's step, add up to (low q_low + high q_high) W^T + bias."""
    low = _activation_tensor(emit, plan, "low_scale", groups, x)
    high = _activation_tensor(emit, plan, "high_scale", groups, x)
    q_low, q_high = emit.outputs(emit.call(OPS.quantize_act_mrq.default, x, low, high, plan.activations.bits, True), 2)
    y_low = _int_linear(emit, plan, q_low, _nonfinite_guard(emit, x, low, [-1]), None, None, torch.float32)
    y_high = _int_linear(emit, plan, q_high, high, None, bias, torch.float32)
    output = emit.call(aten.add.Tensor, y_low, y_high)
    if out_dtype != torch.float32:
        output = emit.call(aten._to_copy.default, output, dtype=out_dtype)
    return output


_LINEAR_RULES: dict[str, Callable[..., Node]] = {
    "float": _float_activations,
    "dynamic_token": _dynamic,
    "dynamic_group": _dynamic,
    "dynamic_sample_group": _dynamic,
    "static": _static,
    "two_region": _two_region,
}


def _lower_linear(gm: GraphModule, node: Node, plan: LayerPlan, groups: tuple[Node, Node] | None) -> None:
    x = node.args[0]
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    emit = _Emitter(gm, node, plan_meta(plan))
    output = _LINEAR_RULES[plan.activations.kind](emit, plan, x, bias, node.meta["val"].dtype, groups)
    output.meta["val"] = node.meta["val"]
    node.replace_all_uses_with(output)
    gm.graph.erase_node(node)


# ------------------------------------------------------------------------------------------ attention

def _lower_attention(gm: GraphModule, node: Node, plan: AttentionPlan, groups: tuple[Node, Node] | None) -> None:
    q, k, v = node.args[:3]
    emit = _Emitter(gm, node, plan_meta(plan))
    path = attention_path(plan.name)
    q_scale, k_scale, v_scale = (
        _per_group(emit, f"{path}.{name}", groups, like, [plan.heads])
        for name, like in (("q_scale", q), ("k_scale", k), ("v_scale", v))
    )
    p_low_scale = _per_group(emit, f"{path}.p_low_scale", groups, q, []) if plan.two_region_softmax else None
    attention = emit.call(OPS.int_attention.default, q, k, v, q_scale, k_scale, v_scale, p_low_scale, plan.bits,
                          plan.softmax_scale)
    # Every output of a sample depends on all of its keys and values: a non-finite q, k or v makes
    # the sample's output non-finite, as softmax(q k^T) v does in float.
    for operand in (q, k, v):
        attention = _nonfinite_guard(emit, operand, attention, [1, 2, 3])
    attention.meta["val"] = node.meta["val"]
    node.replace_all_uses_with(attention)
    gm.graph.erase_node(node)


# ------------------------------------------------------------------------------------------ float edits

def _embedding_scale(gm: GraphModule, edit: GraphEdit, nodes: dict[str, Node]) -> None:
    """add(table, embedding) -> addcmul(table, embedding, u); the table's unsqueeze chain goes (the
    table has the add's trailing shape, so it broadcasts without it)."""
    add = nodes[edit.node_name]
    table_arg, embedding = add.args[:2] if through_transparent(add.args[0]).op == "get_attr" else add.args[1::-1]
    table_node = through_transparent(table_arg)
    with gm.graph.inserting_before(add):
        scale_node = gm.graph.get_attr(edit.buffer)
        addcmul = gm.graph.call_function(aten.addcmul.default, (table_node, embedding, scale_node))
    addcmul.meta.update(add.meta)
    add.replace_all_uses_with(addcmul)
    gm.graph.erase_node(add)
    node: Node = table_arg
    while node is not table_node and not node.users:
        producer = node.args[0]
        gm.graph.erase_node(node)
        node = producer


def apply_edits(gm: GraphModule, plan: ModelPlan, nodes: dict[str, Node] | None = None) -> None:
    """Needs: the plan's edit buffers registered on gm. Guarantees: the plan's float-graph edits
    (GraphEdit) are applied, so the float graph computes what the folded model computes."""
    nodes = nodes if nodes is not None else {node.name: node for node in gm.graph.nodes}
    for edit in plan.edits:
        _embedding_scale(gm, edit, nodes)


# ------------------------------------------------------------------------------------------ the pass

def _needs_weight_sum(layer: LayerPlan) -> bool:
    """Whether the layer's int_linear gets a zero point (and so the weight's code sums): static
    quantizers always pass theirs, dynamic ones unless symmetric."""
    kind = layer.activations.kind
    return kind == "static" or (kind in DYNAMIC_KINDS and not layer.activations.symmetric)


def _node(nodes: dict[str, Node], name: str, owner: str) -> Node:
    if name not in nodes:
        raise ValueError(f"{owner}: the plan names graph node {name!r}, which the captured graph does not have "
                         "(was the model's code or torch's version changed since the plan was made?)")
    return nodes[name]


def lower(gm: GraphModule, plan: ModelPlan) -> None:
    """Needs: a captured float graph whose linear nodes carry meta["dqcompile"]["layer"] (plan_layers;
    the graph's float parameters as the method passes left them), and a complete plan: every
    quantized layer's weight rounded, every calibrated activation quantizer's tensors set.

    Guarantees: the plan's float-graph edits are applied; every tensor of the plan is a buffer of
    gm under the path ModelPlan.tensors gives it (moved to the graph's device), plus each
    asymmetric-activation layer's weight code sums (`weight_sum`, int32 [N, G], not persistent:
    derived from qweight); every linear node of a quantized layer and every planned attention node is
    replaced by the ops of its rule (module docstring), tagged with its plan; the float weights of
    quantized layers are deleted, so the module really holds integer weights; the per-channel operands
    (weight codes, scales, code sums, biases) of linears that read the same codes (q, k, v) are each
    stacked in one tensor, each layer's a view of it (`pack_sibling_weights`, for the compile backend's
    merged GEMM). The graph lints.
    """
    device = _graph_device(gm)
    nodes = {node.name: node for node in gm.graph.nodes}
    for path, tensor in plan.tensors().items():
        _register(gm, path, tensor.to(device))
    apply_edits(gm, plan, nodes)
    derived = []
    for layer in plan.quantized_layers():
        if _needs_weight_sum(layer):
            sums = weight_group_sums(layer.weight.qweight, layer.weight.bits,
                                     layer.weight.group_size or layer.activations.group_size)
            _register(gm, layer.tensor_path("weight_sum"), sums.to(device), persistent=False)
            derived.append(layer.tensor_path("weight_sum"))
    gm.meta[DERIVED_META] = derived

    time_grouped = any(layer.activations.time_grouped for layer in plan.quantized_layers()) or plan.attention
    groups = _time_group_index(gm) if time_grouped else None
    for layer in plan.quantized_layers():
        for node_name in layer.node_names:
            _lower_linear(gm, _node(nodes, node_name, layer.name), layer, groups)
    for attention in plan.attention.values():
        _lower_attention(gm, _node(nodes, attention.node_name, attention.name), attention, groups)
    gm.graph.eliminate_dead_code()
    for layer in plan.quantized_layers():
        owner, _, leaf = layer.weight_name.rpartition(".")
        (gm.get_submodule(owner) if owner else gm)._parameters.pop(leaf, None)
    gm.graph.lint()
    gm.recompile()
    pack_sibling_weights(gm)
