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
- A layer's precision is read from the ops that compute it (weight bits and scale shape, the activation
  quantizer's mode and group size), so the view shows what the graph really runs.
"""

from __future__ import annotations

import colorsys
import math
import operator
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch.fx import GraphModule, Node

import dqcompile.backends.ops  # noqa: F401  (registers torch.ops.dqcompile, which the lowered graph calls)
from dqcompile.passes.annotate_linears import LINEAR
from dqcompile.passes.context import META_KEY
from dqcompile.passes.find_adaln_pairs import AdaLNPair, AttentionPair

if TYPE_CHECKING:
    from dqcompile.viz.errors import LayerError

OPS = torch.ops.dqcompile
INT_LINEAR = OPS.int_linear.default
WEIGHT_ONLY_LINEAR = OPS.weight_only_linear.default
# The ops that multiply a layer's weight: one per call of the layer (two for MRQ's two regions).
PRODUCT_OPS = (INT_LINEAR, WEIGHT_ONLY_LINEAR, LINEAR)

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
                 heat_color(l.sqnr_db) if l.sqnr_db is not None else None]
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
    if node.op == "call_function" and node.target == LINEAR and isinstance(node.args[1], Node):
        weight = node.args[1]
        if weight.op == "get_attr":
            return weight.target.removesuffix(".weight")
    return None


def layer_output_nodes(gm: GraphModule) -> dict[str, list[Node]]:
    """Layer name -> the nodes whose values leave the layer (one per call), in graph order.

    That is the linear op itself in a captured graph or after lower_linears, and whatever a later pass
    made the last op of the layer (the add of MRQ's two products, a dtype cast).
    """
    outputs: dict[str, list[Node]] = {}
    for node in gm.graph.nodes:
        layer = layer_of(node)
        if layer is not None and node.op == "call_function" and any(layer_of(user) != layer for user in node.users):
            outputs.setdefault(layer, []).append(node)
    return outputs


def _product(output: Node) -> Node:
    """The op multiplying the weight that `output` (a layer's output node) comes from."""
    layer, frontier, seen = layer_of(output), [output], set()
    while frontier:
        node = frontier.pop()
        if node.target in PRODUCT_OPS:
            return node
        seen.add(node)
        frontier += [i for i in node.all_input_nodes if i not in seen and layer_of(i) == layer]
    raise ValueError(f"layer {layer}: node {output.name} does not come from a linear op")


def _attr(gm: GraphModule, node: Node) -> torch.Tensor:
    owner, _, name = node.target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name)


def _weights(gm: GraphModule, product: Node) -> tuple[str, tuple[int, int]]:
    """(weight description, (out_features, in_features)) of a linear op."""
    if product.target == LINEAR:
        out_features, in_features = _attr(gm, product.args[1]).shape
        return FLOAT, (int(out_features), int(in_features))
    if product.target == INT_LINEAR:
        qweight, weight_scale, bits, group_size = product.args[3], product.args[4], product.args[6], product.args[7]
    else:
        qweight, weight_scale, bits, group_size = product.args[1], product.args[2], product.args[4], product.args[5]
    out_features, stored = _attr(gm, qweight).shape
    in_features = stored * 2 if bits == 4 else stored  # int4: two columns a byte
    groups = _attr(gm, weight_scale).shape[-1]
    # One group as wide as the layer is per channel, but say "group K" as the spec did.
    group = in_features // groups if groups > 1 else (group_size if group_size == in_features else 0)
    return f"int{bits} {f'group {group}' if group else 'per channel'}", (int(out_features), int(in_features))


def _is_table_read(node: Node) -> bool:
    """Whether a scale argument is a buffer read as it is (one value per tensor), not picked per time group."""
    return node.op == "get_attr"


def _activations(product: Node) -> str:
    """How the activations entering a linear op are quantized, read off the quantizer that made them."""
    if product.target != INT_LINEAR:
        return FLOAT
    producer = product.args[0]
    if producer.target == operator.getitem:
        producer = producer.args[0]
    target, args = producer.target, producer.args
    if target in (OPS.quantize_act.default, OPS.quantize_act_per_sample.default, OPS.ln_modulate_quantize.default):
        bits, group_size = (args[6], args[7]) if target == OPS.ln_modulate_quantize.default else (args[1], args[2])
        if target == OPS.quantize_act_per_sample.default:
            return f"int{bits} dynamic per sample, group {group_size}"
        return f"int{bits} dynamic group {group_size}" if group_size else f"int{bits} dynamic per token"
    if target == OPS.quantize_act_static.default:
        per = "per tensor" if _is_table_read(args[1]) else "per time group"
        return f"int{args[3]} static {per}"
    if target == OPS.quantize_act_mrq.default:
        per = "per tensor" if _is_table_read(args[1]) else "per time group"
        return f"int{args[3]} two-region (MRQ) {per}"
    # A quantizer this module does not know yet: name it rather than guess.
    return f"quantized by {target}"


def layer_precision(gm: GraphModule, output: Node) -> LayerPrecision:
    """The precision of the layer whose output node is `output` (see layer_output_nodes)."""
    product = _product(output)
    return LayerPrecision(_weights(gm, product)[0], _activations(product))


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
            shape=_weights(gm, _product(calls[0]))[1],
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
        if error.note:
            layer = by_name[error.name]
            layer.note = "; ".join(part for part in (layer.note, error.note) if part)
    view.error_mode = modes.pop() if modes else None
