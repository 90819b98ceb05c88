"""Pass and public finder: the linear layers that PTQ4DiT's salience balancing can fold into.

Two kinds of pairs (METHODS.md, PTQ4DiT):

- `AdaLNPair`: one adaLN-modulated LayerNorm output h = LN(x) * (1 + scale) + shift and the linears
  that read it (q, k, v or a fused qkv; fc1). Dividing h by a per-channel vector b is a change of the
  scale and shift rows of the adaLN linear (or of PixArt's per-block scale_shift_table); multiplying
  the consumers' weight columns by b undoes it.
- `AttentionPair`: the value projection(s) of one attention and the output projection(s) that read
  the attention output. Dividing the V rows by b divides the attention output's channels by b
  (softmax(QK^T) V diag(1/b) = (softmax(QK^T) V) diag(1/b)); the output projection's columns take b.

How they are found. A networkx view of the FX graph contracts the ops that only move or select
values (view, unsqueeze, slice, chunk + getitem, dtype casts, ...) into edges. On it, networkx's
DiGraphMatcher finds every copy of the pattern

    source -> (1 + .) -> mul <- LayerNorm,   mul -> add <- source

where source is the adaLN linear, or the add of a scale_shift_table and a shared embedding (PixArt).
Nothing is taken from module or parameter names. Each match is then checked on the real graph by
tracing "channel codes": a tensor whose every element holds the index of the row (or channel) it
comes from is pushed through the contracted ops (each op evaluated on small concrete tensors), so
that where the codes arrive says exactly which rows of the source are the scale and which the shift
(the chunk order differs between families: shift first in DiT, scale first in SD3's
AdaLayerNormContinuous), that the LayerNorm's channels reach the mul unpermuted, and that nothing
else reads the rows the fold would change. The attention pairs are checked the same way, from each
V projection through the attention (emulated: every query position gets the codes of the value
channel it mixes) to the output projections. A candidate that fails a check is left out, with the
reason logged at DEBUG level.
"""

from __future__ import annotations

import heapq
import logging
import operator
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import networkx as nx
import torch
from networkx.algorithms.isomorphism import DiGraphMatcher
from torch import nn
from torch.fx import GraphModule, Node

from dqcompile.capture import Captured, ExampleInputs, capture
from dqcompile.passes.context import PassContext

log = logging.getLogger(__name__)
aten = torch.ops.aten

# Where the analysis pass leaves the pairs that the spec balances (read by salience_balance, fold_balancing).
ANNOTATION = "balance_pairs"


@dataclass(frozen=True)
class AdaLNPair:
    """An adaLN-modulated LayerNorm output and the linears that read it.

    output: graph node name of the modulated output h = LN(x) * (1 + scale) + shift (the add).
    norm: module path of the LayerNorm (its node name when it has none).
    adaln: layer name (module path) of the linear whose output carries scale and shift; for
        PixArt, the shared embedding linear whose output is added to the block's scale_shift_table.
    num_chunks: how many chunks of the LayerNorm's width the source's rows hold (6 in a DiT block).
    scale_chunk, shift_chunk: which chunk is multiplied after the +1, and which is added.
    consumers: layer names of the linears that read h, in graph order.
    table: parameter name of the per-block scale_shift_table (PixArt), else None; the fold then
        writes into the table instead of the shared adaLN linear.
    table_add: graph node name of the add of table and shared embedding (PixArt), else None.
    """

    output: str
    norm: str
    adaln: str
    num_chunks: int
    scale_chunk: int
    shift_chunk: int
    consumers: tuple[str, ...]
    table: str | None = None
    table_add: str | None = None


@dataclass(frozen=True)
class AttentionPair:
    """Value projection(s) -> attention -> output projection(s).

    attention: graph node name of the scaled_dot_product_attention.
    values: layer names of the linears whose rows make the attention's value (two in SD3's joint
        attention, whose image and context values are concatenated along the tokens).
    value_row_offsets: for each value layer, its first V row: channel j of the attention output comes
        from row offset + j (0 for a separate to_v; 2 x width for the V third of a fused qkv).
    outputs: layer names of the output projections that read the attention output (to_out.0, and
        SD3's to_add_out, which reads the context tokens of the same output).
    """

    attention: str
    values: tuple[str, ...]
    value_row_offsets: tuple[int, ...]
    outputs: tuple[str, ...]


BalancePair = AdaLNPair | AttentionPair

# Ops that only move, select or re-type values: contracted in the networkx view, evaluated on codes.
_LAYOUT_OPS = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unsqueeze.default,
    aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.expand.default, aten.slice.Tensor,
    aten.select.int, aten.permute.default, aten.transpose.int, aten.t.default, aten.flatten.using_ints,
    aten.unflatten.int, aten.cat.default, aten.chunk.default, aten.split.Tensor,
    aten.split_with_sizes.default, aten.unbind.int, aten.repeat_interleave.self_int, operator.getitem,
}
# Ops that return their input's values unchanged (dropout only when not training).
_IDENTITY_OPS = {
    aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default, aten.contiguous.default,
    aten.clone.default, aten.alias.default, aten.detach.default, aten.dropout.default,
}
# Users that read only metadata (shapes, dtypes): they do not consume values.
_METADATA_OPS = {
    aten._assert_tensor_metadata.default, aten.sym_size.int, aten.sym_stride.int, aten.sym_numel.default,
    aten.sym_storage_offset.default,
}
_SPLIT_OPS = {aten.chunk.default, aten.split.Tensor, aten.split_with_sizes.default, aten.unbind.int}
_ATTENTION = aten.scaled_dot_product_attention.default


def _is_call(node: Node) -> bool:
    return node.op == "call_function"


def _is_metadata(node: Node) -> bool:
    """Reads only shapes or dtypes (or is export's guard module, which returns nothing)."""
    return (_is_call(node) and node.target in _METADATA_OPS) or (node.op == "call_module" and node.meta.get("val") is None)


def _is_identity(node: Node) -> bool:
    if not _is_call(node) or node.target not in _IDENTITY_OPS:
        return False
    return node.target != aten.dropout.default or not node.args[2]


def _is_transparent(node: Node) -> bool:
    """Whether `node` only moves or re-types values (the networkx view contracts it into an edge)."""
    if _is_identity(node):
        return True
    if not _is_call(node) or node.target not in _LAYOUT_OPS:
        return False
    # getitem picks values only out of a split; out of native_layer_norm (say) it is that op's output.
    return node.target is not operator.getitem or (
        isinstance(node.args[0], Node) and node.args[0].target in _SPLIT_OPS
    )


def _is_norm(node: Node) -> bool:
    if not _is_call(node):
        return False
    if node.target is operator.getitem:
        source = node.args[0]
        return isinstance(source, Node) and source.target == aten.native_layer_norm.default and node.args[1] == 0
    return node.target == aten.layer_norm.default


def _is_linear(node: Node) -> bool:
    """An aten.linear whose weight is a graph attribute (a parameter), as annotate_linears counts them."""
    return (
        _is_call(node) and node.target == aten.linear.default and isinstance(node.args[1], Node)
        and node.args[1].op == "get_attr"
    )


def _is_add_one(node: Node) -> bool:
    """`x + 1` (or `1 + x`) with alpha 1: the (1 + scale) of a modulation."""
    if not _is_call(node) or node.target != aten.add.Tensor or node.kwargs.get("alpha", 1) != 1:
        return False
    a, b = node.args[:2]
    return (isinstance(a, Node) and not isinstance(b, Node) and b == 1) or (
        isinstance(b, Node) and not isinstance(a, Node) and a == 1
    )


def _kind(node: Node) -> str:
    """The op kind the networkx pattern matches on."""
    if _is_norm(node):
        return "norm"
    if _is_linear(node):
        return "linear"
    if _is_add_one(node):
        return "add_one"
    if _is_call(node) and node.target == aten.add.Tensor and all(isinstance(a, Node) for a in node.args[:2]):
        return "add"
    if _is_call(node) and node.target == aten.mul.Tensor and all(isinstance(a, Node) for a in node.args[:2]):
        return "mul"
    return node.op if not _is_call(node) else str(node.target)


def _tensor_inputs(node: Node) -> list[Node]:
    """The Node arguments of `node` (lists flattened), in argument order, without duplicates."""
    found: list[Node] = []
    for arg in (*node.args, *node.kwargs.values()):
        for item in arg if isinstance(arg, (list, tuple)) else (arg,):
            if isinstance(item, Node) and item not in found:
                found.append(item)
    return found


def _through_transparent(node: Node) -> Node:
    """The first producer of `node` that is not a transparent single-input op (a cat stops the walk)."""
    while _is_transparent(node) and node.target != aten.cat.default:
        node = node.args[0]
    return node


def graph_view(gm: GraphModule) -> nx.DiGraph:
    """A networkx DiGraph of the graph's value-computing nodes; transparent ops are contracted into edges.

    Nodes are fx Nodes with attribute `kind` (see _kind); an edge u -> v means v reads u's values,
    directly or through ops that only move, select or re-type them.
    """
    view = nx.DiGraph()
    for node in gm.graph.nodes:
        if _is_transparent(node) or _is_metadata(node) or node.op == "output":
            continue
        view.add_node(node, kind=_kind(node))
        for source in _tensor_inputs(node):
            if _is_metadata(source):
                continue
            roots = _contracted_sources(source)
            for root in roots:
                view.add_edge(root, node)
    return view


def _contracted_sources(node: Node) -> list[Node]:
    """The non-transparent nodes whose values reach `node` through transparent ops (cat has several)."""
    if not _is_transparent(node):
        return [node]
    sources: list[Node] = []
    inputs = node.args[0] if node.target == aten.cat.default else [node.args[0]]
    for item in inputs:
        for root in _contracted_sources(item):
            if root not in sources:
                sources.append(root)
    return sources


def _pattern() -> nx.DiGraph:
    """adaLN source -> (1 + scale) -> mul(LayerNorm(x)) -> add(shift from the same source)."""
    pattern = nx.DiGraph()
    pattern.add_node("source", kinds={"linear", "add"})
    pattern.add_node("one", kinds={"add_one"})
    pattern.add_node("norm", kinds={"norm"})
    pattern.add_node("mul", kinds={"mul"})
    pattern.add_node("shift", kinds={"add"})
    pattern.add_edges_from([("source", "one"), ("one", "mul"), ("norm", "mul"), ("mul", "shift"), ("source", "shift")])
    return pattern


_PATTERN = _pattern()


def _kind_matches(graph_attrs: dict, pattern_attrs: dict) -> bool:
    return graph_attrs["kind"] in pattern_attrs["kinds"]


# ---------------------------------------------------------------------------------------------------
# Channel codes: which rows of a source reach which channels of which consumer.


def _hint(value: Any) -> Any:
    """A symbolic size at 1: the codes do not depend on the batch, the only dynamic dimension, and
    the smallest batch keeps the traced tensors small."""
    if not isinstance(value, torch.SymInt):
        return value
    expr = value.node.expr
    return int(expr.subs({symbol: 1 for symbol in expr.free_symbols}))


def _concrete_shape(node: Node) -> tuple[int, ...]:
    """The node's shape with the dynamic (batch) dimension at 1."""
    return tuple(_hint(size) for size in node.meta["val"].shape)


# Codes are float32 (exact integers up to 2^24 rows), so that NaN can mark "no row of the source".
CODE_DTYPE = torch.float32


def _unknown(node: Node) -> torch.Tensor:
    """Codes of a tensor the trace did not start from: NaN, 'no row of the source'."""
    return torch.full(_concrete_shape(node), torch.nan, dtype=CODE_DTYPE)


def _row_codes(shape: tuple[int, ...], row_dims: int) -> torch.Tensor:
    """Codes of `shape` whose last `row_dims` dims enumerate rows 0, 1, ... (row-major)."""
    rows = shape[len(shape) - row_dims:]
    if torch.Size(rows).numel() > 2**24:
        raise ValueError(f"{torch.Size(rows).numel()} rows are too many for exact float32 channel codes")
    codes = torch.arange(torch.Size(rows).numel(), dtype=CODE_DTYPE).reshape(rows)
    return codes.expand(shape)


@dataclass
class Arrival:
    """Codes arriving at a non-transparent node: its argument `position` (index into _tensor_inputs)."""

    node: Node
    position: int
    codes: torch.Tensor


def _evaluate(node: Node, env: dict[Node, Any], pass_through: Callable[[Node], bool]) -> Any:
    """Run a transparent op (or a pass-through node) on codes; inputs outside the trace are NaN."""
    if _is_identity(node) or pass_through(node):
        first = next(arg for arg in node.args if isinstance(arg, Node))
        return env[first] if first in env else _unknown(first)

    def concrete(arg: Any) -> Any:
        if isinstance(arg, Node):
            if arg in env:
                return env[arg]
            value = arg.meta.get("val")
            return _unknown(arg) if isinstance(value, torch.Tensor) else _hint(value)
        if isinstance(arg, (list, tuple)):
            return type(arg)(concrete(item) for item in arg)
        return arg

    args = [concrete(arg) for arg in node.args]
    kwargs = {key: concrete(value) for key, value in node.kwargs.items()}
    # Codes may be non-contiguous views (expand, transpose): reshape where the model had a view.
    target = aten.reshape.default if node.target in (aten.view.default, aten._unsafe_view.default) else node.target
    return target(*args, **kwargs)


class CodeTracer:
    """Pushes channel codes through the transparent ops of one graph (see the module docstring)."""

    def __init__(self, gm: GraphModule) -> None:
        self.order = {node: index for index, node in enumerate(gm.graph.nodes)}

    def trace(
        self, start: Node, codes: torch.Tensor, pass_through: Callable[[Node], bool] = lambda node: False
    ) -> list[Arrival]:
        """Push `codes` (the values of `start`) through transparent ops; return where they arrive.

        pass_through: further nodes to treat as identity on their first input (the +1 of a
        modulation). Arrivals whose codes are all NaN (nothing of the source) are dropped. Nodes are
        visited in graph order, so an op with several traced inputs (a cat) sees all of them.
        """
        env: dict[Node, Any] = {start: codes}
        arrivals: list[Arrival] = []
        queue = [(self.order[user], user) for user in start.users]
        heapq.heapify(queue)
        visited: set[Node] = set()
        while queue:
            _, node = heapq.heappop(queue)
            if node in visited or _is_metadata(node):
                continue
            visited.add(node)
            if node.op != "output" and (_is_transparent(node) or pass_through(node)):
                env[node] = _evaluate(node, env, pass_through)
                for user in node.users:
                    heapq.heappush(queue, (self.order[user], user))
                continue
            for position, arg in enumerate(_tensor_inputs(node)):
                value = env.get(arg)
                if isinstance(value, torch.Tensor) and not bool(value.isnan().all()):
                    arrivals.append(Arrival(node, position, value))
        return arrivals


def channel_rows(codes: torch.Tensor) -> torch.Tensor | None:
    """For each channel (last dim) of arriving codes, the source row it carries; -1 for none.

    None when some channel carries several rows (the ops between mixed channels), which no per-row
    fold can follow.
    """
    flat = codes.reshape(-1, codes.shape[-1])
    first = flat[0]
    if bool((flat == first).all()):  # the common case: the same rows at every position (no NaN)
        return first.long()
    known = ~flat.isnan()
    high = torch.where(known, flat, -torch.inf).amax(0)
    low = torch.where(known, flat, torch.inf).amin(0)
    present = known.any(0)
    if bool((high[present] != low[present]).any()):
        return None
    return torch.where(present, high, -1.0).long()


def _contiguous_offset(rows: torch.Tensor | None) -> int | None:
    """o when channel j carries row o + j for every j, else None."""
    if rows is None or bool((rows < 0).any()):
        return None
    offset = int(rows[0])
    return offset if torch.equal(rows, torch.arange(offset, offset + rows.numel())) else None


def _rows_of(arrivals: list[Arrival]) -> set[int]:
    rows: set[int] = set()
    for arrival in arrivals:
        values = arrival.codes[~arrival.codes.isnan()]
        rows.update(int(v) for v in values.unique())
    return rows


def _layer_name(linear: Node) -> str:
    return linear.args[1].target.removesuffix(".weight")


def _module_path(node: Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else node.name


def _attr_used_only_by(attr: Node, users: set[Node]) -> bool:
    return attr.op == "get_attr" and set(attr.users) <= users


# ---------------------------------------------------------------------------------------------------
# adaLN pairs


def _modulation_source(gm: GraphModule, source: Node) -> tuple[str, int, int, Node | None] | None:
    """(adaLN name, rows, row dims, table get_attr or None) of a pattern's source node, or None.

    A linear's rows are its output features; a PixArt source add(table, embedding) has the rows of
    the table parameter, enumerated over the table's shape at the end of the add's output.
    """
    if _is_linear(source):
        bias = source.args[2] if len(source.args) > 2 else None
        if not (isinstance(bias, Node) and bias.op == "get_attr" and _attr_used_only_by(source.args[1], {source})):
            log.debug("adaLN %s: not foldable (no bias parameter, or its weight is used elsewhere)", source.name)
            return None
        return _layer_name(source), _concrete_shape(source)[-1], 1, None
    for table_arg, embedding_arg in (source.args[:2], source.args[1::-1]):
        table, embedding = _through_transparent(table_arg), _through_transparent(embedding_arg)
        if table.op != "get_attr" or embedding.op == "get_attr" or not _single_path(table, source):
            continue
        shape = tuple(operator.attrgetter(table.target)(gm).shape)
        while shape and shape[0] == 1:
            shape = shape[1:]
        out_shape = _concrete_shape(source)
        if not shape or out_shape[len(out_shape) - len(shape):] != shape:
            return None
        name = _layer_name(embedding) if _is_linear(embedding) else embedding.name
        return name, torch.Size(shape).numel(), len(shape), table
    return None


def _single_path(start: Node, end: Node) -> bool:
    """Whether `start` reaches `end` through nodes that each have one user (nothing else reads it)."""
    node = start
    while node is not end:
        if len(node.users) != 1:
            return False
        node = next(iter(node.users))
    return True


def _verified_adaln_pair(gm: GraphModule, tracer: CodeTracer, roles: dict[str, Node]) -> AdaLNPair | None:
    source, one, norm, mul, shift = (roles[r] for r in ("source", "one", "norm", "mul", "shift"))
    described = _modulation_source(gm, source)
    if described is None:
        return None
    adaln, rows, row_dims, table = described
    width = _concrete_shape(norm)[-1]
    if rows % width:
        log.debug("%s: %d source rows are not chunks of the LayerNorm width %d", shift.name, rows, width)
        return None

    source_arrivals = tracer.trace(source, _row_codes(_concrete_shape(source), row_dims), _is_add_one)
    at_mul = [a for a in source_arrivals if a.node is mul]
    at_shift = [a for a in source_arrivals if a.node is shift]
    if len(at_mul) != 1 or len(at_shift) != 1:
        return None
    scale_offset = _contiguous_offset(channel_rows(at_mul[0].codes))
    shift_offset = _contiguous_offset(channel_rows(at_shift[0].codes))
    if scale_offset is None or shift_offset is None or scale_offset % width or shift_offset % width:
        log.debug("%s: scale or shift is not one whole chunk of %s", shift.name, adaln)
        return None
    folded_rows = set(range(scale_offset, scale_offset + width)) | set(range(shift_offset, shift_offset + width))
    if _rows_of([a for a in source_arrivals if a.node not in (mul, shift)]) & folded_rows:
        log.debug("%s: the scale or shift rows of %s are also read elsewhere", shift.name, adaln)
        return None

    identity = torch.arange(width)
    norm_arrivals = [a for a in tracer.trace(norm, _row_codes(_concrete_shape(norm), 1)) if a.node is mul]
    mul_arrivals = tracer.trace(mul, _row_codes(_concrete_shape(mul), 1))
    if len(norm_arrivals) != 1 or not _same_rows(norm_arrivals[0], identity):
        return None
    if len(mul_arrivals) != 1 or mul_arrivals[0].node is not shift or not _same_rows(mul_arrivals[0], identity):
        log.debug("%s: the modulated LayerNorm is read by more than its shift", shift.name)
        return None

    consumers = _identity_consumers(tracer, shift, width)
    if consumers is None:
        return None
    return AdaLNPair(
        output=shift.name,
        norm=_module_path(norm) if norm.meta.get("nn_module_stack") else norm.name,
        adaln=adaln,
        num_chunks=rows // width,
        scale_chunk=scale_offset // width,
        shift_chunk=shift_offset // width,
        consumers=consumers,
        table=table.target if table is not None else None,
        table_add=source.name if table is not None else None,
    )


def _same_rows(arrival: Arrival, expected: torch.Tensor) -> bool:
    rows = channel_rows(arrival.codes)
    return rows is not None and torch.equal(rows, expected)


def _identity_consumers(tracer: CodeTracer, output: Node, width: int) -> tuple[str, ...] | None:
    """Layer names of the linears reading `output` as their input, channels unpermuted; None if
    anything else reads it or a consumer's weight is also used by another node."""
    arrivals = tracer.trace(output, _row_codes(_concrete_shape(output), 1))
    if not arrivals or any(not _is_linear(a.node) or a.position != 0 for a in arrivals):
        log.debug("%s: read by something other than linear layers", output.name)
        return None
    if not all(_same_rows(a, torch.arange(width)) for a in arrivals):
        return None
    linears = {a.node for a in arrivals}
    if not all(_attr_used_only_by(node.args[1], linears) for node in linears):
        log.debug("%s: a consumer's weight is shared with another layer", output.name)
        return None
    names: list[str] = []
    for arrival in arrivals:
        name = _layer_name(arrival.node)
        if name not in names:
            names.append(name)
    return tuple(names)


def _adaln_pairs(gm: GraphModule) -> list[AdaLNPair]:
    matcher = DiGraphMatcher(graph_view(gm), _PATTERN, node_match=_kind_matches)
    tracer = CodeTracer(gm)
    pairs: dict[str, AdaLNPair] = {}
    for mapping in matcher.subgraph_monomorphisms_iter():
        roles = {role: node for node, role in mapping.items()}
        if roles["shift"].name in pairs:
            continue
        pair = _verified_adaln_pair(gm, tracer, roles)
        if pair is not None:
            pairs[pair.output] = pair
    order = {node.name: index for node, index in tracer.order.items()}
    return sorted(pairs.values(), key=lambda pair: order[pair.output])


# ---------------------------------------------------------------------------------------------------
# V projection -> attention output projection pairs


def _value_linears(value: Node) -> list[Node] | None:
    """The linears whose outputs make an attention's value through transparent ops, or None."""
    found: list[Node] = []
    for root in _contracted_sources(value):
        if not _is_linear(root):
            return None
        found.append(root)
    return found


def _emulated_attention(value_codes: torch.Tensor, attention: Node) -> torch.Tensor | None:
    """Codes of an attention's output given its value's: each output channel carries the row of the
    value channel it averages; None when a value channel mixes rows across tokens."""
    out_shape = _concrete_shape(attention)
    if value_codes.shape[:-2] != out_shape[:-2] or value_codes.shape[-1] != out_shape[-1]:
        return None
    known = ~value_codes.isnan()
    high = torch.where(known, value_codes, -torch.inf).amax(-2, keepdim=True)
    low = torch.where(known, value_codes, torch.inf).amin(-2, keepdim=True)
    present = known.any(-2, keepdim=True)
    if bool((high != low)[present].any()):
        return None
    return torch.where(present, high, torch.nan).expand(out_shape).clone()


def _verified_attention_pair(tracer: CodeTracer, attention: Node) -> AttentionPair | None:
    query, key, value_input = attention.args[:3]
    if value_input in (query, key):  # V rows would also shape the attention weights
        return None
    values = _value_linears(value_input)
    if not values:
        return None
    outputs: tuple[str, ...] | None = None
    offsets: list[int] = []
    for value in values:
        arrivals = tracer.trace(value, _row_codes(_concrete_shape(value), 1))
        at_value = [a for a in arrivals if a.node is attention and a.position == _position(attention, 2)]
        if len(at_value) != 1 or not _attr_used_only_by(value.args[1], {value}):
            return None
        output_codes = _emulated_attention(at_value[0].codes, attention)
        if output_codes is None:
            log.debug("%s: value channels of %s mix across tokens", attention.name, value.name)
            return None
        reached = tracer.trace(attention, output_codes)
        if not reached or any(not _is_linear(a.node) or a.position != 0 for a in reached):
            log.debug("%s: its output is read by something other than linear layers", attention.name)
            return None
        offset_set = {_contiguous_offset(channel_rows(a.codes)) for a in reached}
        if len(offset_set) != 1 or None in offset_set:
            return None
        offset = offset_set.pop()
        width = reached[0].codes.shape[-1]
        if _rows_of([a for a in arrivals if a is not at_value[0]]) & set(range(offset, offset + width)):
            log.debug("%s: V rows of %s are also read elsewhere", attention.name, value.name)
            return None
        linears = {a.node for a in reached}
        if not all(_attr_used_only_by(node.args[1], linears) for node in linears):
            return None
        names = tuple(dict.fromkeys(_layer_name(a.node) for a in reached))
        if outputs is not None and names != outputs:
            return None
        outputs = names
        offsets.append(offset)
    return AttentionPair(
        attention=attention.name,
        values=tuple(_layer_name(v) for v in values),
        value_row_offsets=tuple(offsets),
        outputs=outputs,
    )


def _position(node: Node, arg_index: int) -> int:
    """The index in _tensor_inputs(node) of node.args[arg_index]."""
    return _tensor_inputs(node).index(node.args[arg_index])


def _attention_pairs(gm: GraphModule) -> list[AttentionPair]:
    tracer = CodeTracer(gm)
    pairs = []
    for node in gm.graph.nodes:
        if _is_call(node) and node.target == _ATTENTION:
            pair = _verified_attention_pair(tracer, node)
            if pair is not None:
                pairs.append(pair)
    return pairs


# ---------------------------------------------------------------------------------------------------
# Public entry points


def pairs_in_graph(gm: GraphModule) -> list[BalancePair]:
    """Every AdaLNPair of the graph (graph order), then every AttentionPair (graph order)."""
    return [*_adaln_pairs(gm), *_attention_pairs(gm)]


def find_adaln_pairs(
    model_or_captured: nn.Module | Captured | GraphModule, example_inputs: ExampleInputs | None = None
) -> list[BalancePair]:
    """The salience-balancing pairs of a model: AdaLNPair entries, then AttentionPair entries.

    model_or_captured: a model (captured here with `example_inputs`, by default those that
        dqcompile.example_inputs builds for diffusers DiT / PixArt / SD3), a `Captured`, or a
        captured graph module. The model is not modified.
    """
    if isinstance(model_or_captured, GraphModule):
        gm = model_or_captured
    elif isinstance(model_or_captured, Captured):
        gm = model_or_captured.graph_module
    else:
        if example_inputs is None:
            from dqcompile.example_inputs import default_example_inputs

            example_inputs = default_example_inputs(model_or_captured)
        gm = capture(model_or_captured, example_inputs).graph_module
    return pairs_in_graph(gm)


def balanced_layers(pair: BalancePair) -> tuple[str, ...]:
    """The layers whose inputs a pair's balancing vector divides (and whose columns it multiplies)."""
    return pair.consumers if isinstance(pair, AdaLNPair) else pair.outputs


def analyze_balance_pairs(gm: GraphModule, ctx: PassContext) -> None:
    """Needs: annotate_linears. Guarantees: ctx.annotations[ANNOTATION] lists the pairs to balance:
    every AdaLNPair with a quantized consumer, and (ptq4dit.balance_out_proj) every AttentionPair
    with a quantized output projection; their balanced layers are added to ctx.observe, so that
    calibration records their inputs per timestep. The graph is not changed.
    """
    chosen: list[BalancePair] = []
    for pair in pairs_in_graph(gm):
        if isinstance(pair, AttentionPair) and not ctx.spec.ptq4dit.balance_out_proj:
            continue
        layers = balanced_layers(pair)
        if any(name in ctx.layers and ctx.layers[name].quantized for name in layers):
            chosen.append(pair)
            ctx.observe |= set(layers)
    ctx.annotations[ANNOTATION] = chosen


def iter_pairs(ctx: PassContext) -> Iterator[BalancePair]:
    """The pairs analyze_balance_pairs chose, in order."""
    yield from ctx.annotations.get(ANNOTATION, [])
