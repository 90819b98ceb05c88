"""The graph view's data: a captured or lowered FX graph as modules, operations, layers and precisions.

Both renderers (the HTML page and the DOT file) draw a `GraphView`; nothing else reads the graph.

- Modules come from each node's `nn_module_stack`. The module tree is built by path prefix (the parent of
  `blocks.0.attn1` is `blocks.0`), so a module called from elsewhere (diffusers DiT calls block 0's
  timestep embedder again for its final layer) still sits under its owner.
- Operations are the nodes the output depends on, except parameter reads (get_attr: shown as part of
  their layer): export's shape guards and dtype assertions, and inputs fixed at capture such as
  return_dict, are left out.
- Layers are the linear layers: nodes tagged `meta["dqcompile"]["layer"]` (annotated or lowered graphs)
  and aten.linear nodes on a parameter (a plain captured graph), named by the weight's module path.
- A layer's precision is read from the plan its lowered nodes carry (meta["dqcompile"]["plan"]), the
  same object the lowering emitted the ops from, so the view shows what the graph really runs.
"""

from __future__ import annotations

import colorsys
import math
import operator
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch.fx import GraphModule, Node

import dqcompile.backends.ops  # noqa: F401  (registers torch.ops.dqcompile, which the lowered graph calls)
from dqcompile.graph import is_linear
from dqcompile.methods.ptq4dit import AdaLNPair, AttentionPair
from dqcompile.passes.context import META_KEY
from dqcompile.plan import LayerPlan

if TYPE_CHECKING:
    from dqcompile.viz.errors import LayerError

FLOAT = "float"
FLOAT_COLOR = "#c9ced6"
# Fill colours of the quantized precisions, in their sorted order (float, always grey, sorts last).
PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#b07aa1", "#76b7b2", "#edc948", "#ff9da7", "#9c755f")
# The SQNR heat scale: red at or below HEAT_LOW_DB, through yellow, to green at or above HEAT_HIGH_DB.
# Fixed, not the page's own range, so that pages of different specs compare by colour: 8-bit layers
# land near 40 dB, 4-bit weights near 20 dB.
HEAT_LOW_DB, HEAT_HIGH_DB = 10.0, 45.0


def heat_color(sqnr_db: float) -> str:
    """The heat scale's colour of an SQNR, as #rrggbb."""
    t = 1.0 if sqnr_db == math.inf else min(1.0, max(0.0, (sqnr_db - HEAT_LOW_DB) / (HEAT_HIGH_DB - HEAT_LOW_DB)))
    red, green, blue = colorsys.hls_to_rgb(t / 3.0, 0.45 if t > 0.5 else 0.55, 0.75)
    return "#" + "".join(f"{round(255 * c):02x}" for c in (red, green, blue))


# A pair to draw: find_adaln_pairs' AdaLNPair (adaln -> consumers) or AttentionPair (values -> outputs),
# or a mapping with "source" and "consumers" layer names and optionally a "note".
PairLike = AdaLNPair | AttentionPair | Mapping[str, Any]


@dataclass(frozen=True)
class LayerPrecision:
    """How a layer computes: weights like "int4 per channel", activations like "int8 dynamic per token"."""

    weights: str
    activations: str

    @property
    def label(self) -> str:
        if self.weights == FLOAT and self.activations == FLOAT:
            return FLOAT
        return f"W {self.weights} · A {self.activations}"

    def sort_key(self) -> tuple:
        return (self.weights == FLOAT, self.weights, self.activations)


@dataclass
class ModuleInfo:
    id: int
    path: str
    cls: str
    parent: int  # -1 for the root (path "")


@dataclass
class NodeInfo:
    id: int
    name: str
    op: str  # what the node computes: "aten.add.Tensor", "dqcompile.int_linear.default", "input", "output"
    module: int
    layer: int  # index into GraphView.layers, -1 when the node is not part of a linear layer
    inputs: list[int] = field(default_factory=list)


@dataclass
class LayerInfo:
    name: str
    module: int  # the module holding the layer's output op
    precision: int  # index into GraphView.precisions
    shape: tuple[int, int]  # (out_features, in_features)
    calls: int
    note: str = ""
    sqnr_db: float | None = None
    weight_sqnr_db: float | None = None  # the attribution split (dqcompile.viz.errors), when measured
    activation_sqnr_db: float | None = None


@dataclass
class PrecisionInfo:
    label: str
    weights: str
    activations: str
    color: str


@dataclass
class PairInfo:
    kind: str  # "adaLN" (modulation -> linears reading it) or "V->out" (value rows -> output projection)
    sources: list[str]
    consumers: list[str]
    note: str = ""


@dataclass
class GraphView:
    """What the renderers draw. `nodes` are in graph (topological) order; node ids are their indices."""

    title: str
    modules: list[ModuleInfo]
    nodes: list[NodeInfo]
    layers: list[LayerInfo]
    precisions: list[PrecisionInfo]
    pairs: list[PairInfo]
    error_mode: str | None = None  # "isolated" or "accumulated" when the layers carry SQNRs

    def layer(self, name: str) -> LayerInfo:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no layer {name!r} in the graph view")

    def to_json(self) -> dict[str, Any]:
        """The compact form the page's script reads (lists of fields, not objects, to keep it small)."""
        return {
            "title": self.title,
            "error_mode": self.error_mode,
            "modules": [[m.path, m.cls, m.parent] for m in self.modules],
            "nodes": [[n.name, n.op, n.module, n.layer, n.inputs] for n in self.nodes],
            "layers": [
                [l.name, l.module, l.precision, list(l.shape), l.calls, l.note, _finite_or_text(l.sqnr_db),
                 heat_color(l.sqnr_db) if l.sqnr_db is not None else None, _finite_or_text(l.weight_sqnr_db),
                 _finite_or_text(l.activation_sqnr_db)]
                for l in self.layers
            ],
            "precisions": [[p.label, p.weights, p.activations, p.color] for p in self.precisions],
            "pairs": [[p.kind, p.sources, p.consumers, p.note] for p in self.pairs],
        }


def _finite_or_text(value: float | None) -> float | str | None:
    """JSON has no infinity: an exact layer's SQNR is written as the text "inf" (a silent one's as "-inf")."""
    if value is not None and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


def layer_of(node: Node) -> str | None:
    """The linear layer a node belongs to: its annotation, or the weight path of an aten.linear on a parameter."""
    layer = node.meta.get(META_KEY, {}).get("layer")
    if layer is not None:
        return layer
    return node.args[1].target.removesuffix(".weight") if is_linear(node) else None


def layer_output_nodes(gm: GraphModule) -> dict[str, list[Node]]:
    """Layer name -> the nodes whose values leave the layer (one per call), in graph order.

    That is the linear op itself in a captured graph, and in a lowered one the last op the lowering
    emitted for the layer (the integer linear, MRQ's add of two products, a dtype cast).
    """
    outputs: dict[str, list[Node]] = {}
    for node in gm.graph.nodes:
        layer = layer_of(node)
        if layer is not None and node.op == "call_function" and any(layer_of(user) != layer for user in node.users):
            outputs.setdefault(layer, []).append(node)
    return outputs


def layer_plan(node: Node) -> LayerPlan | None:
    """The plan a lowered node was emitted from (None in a float graph)."""
    plan = node.meta.get(META_KEY, {}).get("plan")
    return plan if isinstance(plan, LayerPlan) else None


def _weights_label(plan: LayerPlan) -> str:
    group = plan.weight.group_size
    return f"int{plan.weight.bits} {f'group {group}' if group else 'per channel'}"


def _activations_label(plan: LayerPlan) -> str:
    act = plan.activations
    per = "per time group" if act.time_grouped else "per tensor"
    return {
        "float": FLOAT,
        "dynamic_token": f"int{act.bits} dynamic per token",
        "dynamic_group": f"int{act.bits} dynamic group {act.group_size}",
        "dynamic_sample_group": f"int{act.bits} dynamic per sample, group {act.group_size}",
        "static": f"int{act.bits} static {per}",
        "two_region": f"int{act.bits} two-region (MRQ) {per}",
    }[act.kind]


def layer_precision(gm: GraphModule, output: Node) -> LayerPrecision:
    """The precision of the layer whose output node is `output` (see layer_output_nodes)."""
    plan = layer_plan(output)
    if plan is None:
        return LayerPrecision(FLOAT, FLOAT)
    return LayerPrecision(_weights_label(plan), _activations_label(plan))


def layer_shape(gm: GraphModule, output: Node) -> tuple[int, int]:
    """(out_features, in_features) of the layer whose output node is `output`."""
    plan = layer_plan(output)
    if plan is not None:
        return plan.out_features, plan.in_features
    weight = output.args[1]
    owner, _, name = weight.target.rpartition(".")
    out_features, in_features = getattr(gm.get_submodule(owner) if owner else gm, name).shape
    return int(out_features), int(in_features)


def _module_chain(node: Node) -> list[tuple[str, str]]:
    """(path, class) of the modules a node was traced in, outermost first.

    Export marks nodes it makes itself (shape guards) with a stack whose class is not a dotted type
    name; those belong to the root.
    """
    stack = node.meta.get("nn_module_stack") or {}
    return [(path, cls) for path, cls in stack.values() if "." in cls]


def _shown_nodes(gm: GraphModule) -> list[Node]:
    """The nodes the output depends on, less parameter reads, in graph order."""
    needed: set[Node] = set()
    for node in reversed(gm.graph.nodes):
        if node.op == "output" or any(user in needed for user in node.users):
            needed.add(node)
    return [node for node in gm.graph.nodes if node in needed and node.op != "get_attr"]


def _op_name(node: Node) -> str:
    if node.op == "placeholder":
        return "input"
    if node.op == "output":
        return "output"
    if node.op == "call_module":
        return f"module {node.target}"
    target = node.target
    return getattr(target, "__name__", str(target)) if target is operator.getitem else str(target)


def _pair_info(pair: PairLike) -> PairInfo:
    if isinstance(pair, AdaLNPair):
        return PairInfo("adaLN", [pair.adaln], list(pair.consumers))
    if isinstance(pair, AttentionPair):
        return PairInfo("V->out", list(pair.values), list(pair.outputs))
    if isinstance(pair, Mapping):
        return PairInfo("adaLN", [str(pair["source"])], [str(c) for c in pair["consumers"]], str(pair.get("note", "")))
    raise TypeError(f"a pair must be an AdaLNPair, an AttentionPair or a mapping, got {type(pair).__name__}")


def build_graph_view(
    gm: GraphModule,
    *,
    title: str = "dqcompile graph",
    errors: Iterable[LayerError] | None = None,
    pairs: Iterable[PairLike] | None = None,
    notes: Mapping[str, str] | None = None,
) -> GraphView:
    """The view of `gm` (a captured or lowered graph).

    errors: LayerError objects (dqcompile.viz.layer_errors), shown as each layer's SQNR.
    pairs: balancing pairs (find_adaln_pairs' AdaLNPair and AttentionPair, or mappings with
        "source" and "consumers" layer names and optionally a "note").
    notes: layer name -> a note shown with the layer (the report's reasons and method notes).
    Raises ValueError naming the layer when errors or pairs name a layer the graph does not have.
    """
    modules: list[ModuleInfo] = [ModuleInfo(0, "", type(gm).__name__, -1)]
    module_ids: dict[str, int] = {"": 0}
    chains = {node: _module_chain(node) for node in gm.graph.nodes}
    for chain in chains.values():
        for path, cls in chain:
            if path == "":
                modules[0].cls = cls.rpartition(".")[2]
            elif path not in module_ids:
                module_ids[path] = len(modules)
                modules.append(ModuleInfo(len(modules), path, cls.rpartition(".")[2], -1))
    for module in modules[1:]:
        module.parent = _parent_id(module.path, module_ids)

    outputs = layer_output_nodes(gm)
    layer_index = {name: i for i, name in enumerate(outputs)}
    precisions = {name: layer_precision(gm, nodes[0]) for name, nodes in outputs.items()}
    ordered = sorted(set(precisions.values()), key=LayerPrecision.sort_key)
    colors = iter(PALETTE * (len(ordered) // len(PALETTE) + 1))
    precision_infos = [
        PrecisionInfo(p.label, p.weights, p.activations, FLOAT_COLOR if p.label == FLOAT else next(colors))
        for p in ordered
    ]
    precision_index = {p: i for i, p in enumerate(ordered)}

    shown = _shown_nodes(gm)
    node_ids = {node: i for i, node in enumerate(shown)}
    nodes = []
    for node in shown:
        chain = chains[node]
        layer = layer_of(node)
        nodes.append(
            NodeInfo(
                id=node_ids[node],
                name=node.name,
                op=_op_name(node),
                module=module_ids[chain[-1][0]] if chain else 0,
                layer=layer_index.get(layer, -1) if layer is not None else -1,
                inputs=[node_ids[source] for source in node.all_input_nodes if source in node_ids],
            )
        )

    notes = dict(notes or {})
    layers = [
        LayerInfo(
            name=name,
            module=nodes[node_ids[calls[0]]].module,
            precision=precision_index[precisions[name]],
            shape=layer_shape(gm, calls[0]),
            calls=len(calls),
            note=notes.get(name, ""),
        )
        for name, calls in outputs.items()
    ]
    view = GraphView(title, modules, nodes, layers, precision_infos, [])
    if errors is not None:
        _attach_errors(view, list(errors))
    if pairs is not None:
        view.pairs = [_pair_info(pair) for pair in pairs]
        for pair in view.pairs:
            for name in (*pair.sources, *pair.consumers):
                if name not in layer_index:
                    raise ValueError(f"{pair.kind} pair {pair.sources} -> {pair.consumers}: layer {name} is not in the graph")
    return view


def _parent_id(path: str, module_ids: Mapping[str, int]) -> int:
    """The nearest enclosing module that the graph knows (containers like ModuleList are never called)."""
    prefix = path
    while "." in prefix:
        prefix = prefix.rpartition(".")[0]
        if prefix in module_ids:
            return module_ids[prefix]
    return 0


def _attach_errors(view: GraphView, errors: list[LayerError]) -> None:
    modes = {error.mode for error in errors}
    if len(modes) > 1:
        raise ValueError(f"errors mix modes {sorted(modes)}: show one mode per page")
    by_name = {layer.name: layer for layer in view.layers}
    for error in errors:
        if error.name not in by_name:
            raise ValueError(f"layer error for {error.name}: the graph has no such layer")
        if error.measured:
            by_name[error.name].sqnr_db = error.sqnr_db
            if getattr(error, "weight_noise", None) is not None:
                by_name[error.name].weight_sqnr_db = error.weight_sqnr_db
                by_name[error.name].activation_sqnr_db = error.activation_sqnr_db
        if error.note:
            layer = by_name[error.name]
            layer.note = "; ".join(part for part in (layer.note, error.note) if part)
    view.error_mode = modes.pop() if modes else None
