"""Graph utilities: predicates over FX nodes, a networkx view of a graph, and channel-code tracing.

The passes read captured ATen graphs through these helpers rather than each writing its own:
- predicates: what a node is (a linear on a parameter, a LayerNorm, a `+ 1`, an op that only moves
  or re-types values, one that reads only metadata);
- `graph_view`: a networkx DiGraph of the value-computing nodes, in which the ops that only move,
  select or re-type values (view, unsqueeze, slice, chunk + getitem, dtype casts, ...) are contracted
  into edges, so that a pattern can be matched on it with networkx's subgraph matcher;
- channel codes (`CodeTracer`): a tensor whose every element holds the index of the row (or channel)
  it comes from is pushed through the contracted ops, each evaluated on small concrete tensors, to
  find exactly which rows of a source reach which channels of which consumer.
"""

from __future__ import annotations

import heapq
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import networkx as nx
import torch
from torch.fx import GraphModule, Node

aten = torch.ops.aten
LINEAR = aten.linear.default

# Ops that only move, select or re-type values: contracted in the networkx view, evaluated on codes.
LAYOUT_OPS = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unsqueeze.default,
    aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.expand.default, aten.slice.Tensor,
    aten.select.int, aten.permute.default, aten.transpose.int, aten.t.default, aten.flatten.using_ints,
    aten.unflatten.int, aten.cat.default, aten.chunk.default, aten.split.Tensor,
    aten.split_with_sizes.default, aten.unbind.int, aten.repeat_interleave.self_int, operator.getitem,
}
# Ops that return their input's values unchanged (dropout only when not training).
IDENTITY_OPS = {
    aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default, aten.contiguous.default,
    aten.clone.default, aten.alias.default, aten.detach.default, aten.dropout.default,
}
# Users that read only metadata (shapes, dtypes): they do not consume values.
METADATA_OPS = {
    aten._assert_tensor_metadata.default, aten.sym_size.int, aten.sym_stride.int, aten.sym_numel.default,
    aten.sym_storage_offset.default,
}
SPLIT_OPS = {aten.chunk.default, aten.split.Tensor, aten.split_with_sizes.default, aten.unbind.int}
ATTENTION = aten.scaled_dot_product_attention.default


def is_call(node: Node) -> bool:
    return node.op == "call_function"


def is_metadata(node: Node) -> bool:
    """Reads only shapes or dtypes (or is export's guard module, which returns nothing)."""
    return (is_call(node) and node.target in METADATA_OPS) or (node.op == "call_module" and node.meta.get("val") is None)


def is_identity(node: Node) -> bool:
    if not is_call(node) or node.target not in IDENTITY_OPS:
        return False
    return node.target != aten.dropout.default or not node.args[2]


def is_transparent(node: Node) -> bool:
    """Whether `node` only moves or re-types values (the networkx view contracts it into an edge)."""
    if is_identity(node):
        return True
    if not is_call(node) or node.target not in LAYOUT_OPS:
        return False
    # getitem picks values only out of a split; out of native_layer_norm (say) it is that op's output.
    return node.target is not operator.getitem or (
        isinstance(node.args[0], Node) and node.args[0].target in SPLIT_OPS
    )


def is_norm(node: Node) -> bool:
    if not is_call(node):
        return False
    if node.target is operator.getitem:
        source = node.args[0]
        return isinstance(source, Node) and source.target == aten.native_layer_norm.default and node.args[1] == 0
    return node.target == aten.layer_norm.default


def is_linear(node: Node) -> bool:
    """An aten.linear whose weight is a graph attribute (a parameter): a linear layer dqcompile can quantize."""
    return (
        is_call(node) and node.target == LINEAR and isinstance(node.args[1], Node)
        and node.args[1].op == "get_attr"
    )


def is_add_one(node: Node) -> bool:
    """`x + 1` (or `1 + x`) with alpha 1: the (1 + scale) of a modulation."""
    if not is_call(node) or node.target != aten.add.Tensor or node.kwargs.get("alpha", 1) != 1:
        return False
    a, b = node.args[:2]
    return (isinstance(a, Node) and not isinstance(b, Node) and b == 1) or (
        isinstance(b, Node) and not isinstance(a, Node) and a == 1
    )


def node_kind(node: Node) -> str:
    """The op kind the networkx pattern matches on."""
    if is_norm(node):
        return "norm"
    if is_linear(node):
        return "linear"
    if is_add_one(node):
        return "add_one"
    if is_call(node) and node.target == aten.add.Tensor and all(isinstance(a, Node) for a in node.args[:2]):
        return "add"
    if is_call(node) and node.target == aten.mul.Tensor and all(isinstance(a, Node) for a in node.args[:2]):
        return "mul"
    return node.op if not is_call(node) else str(node.target)


def tensor_inputs(node: Node) -> list[Node]:
    """The Node arguments of `node` (lists flattened), in argument order, without duplicates."""
    found: list[Node] = []
    for arg in (*node.args, *node.kwargs.values()):
        for item in arg if isinstance(arg, (list, tuple)) else (arg,):
            if isinstance(item, Node) and item not in found:
                found.append(item)
    return found


def through_transparent(node: Node) -> Node:
    """The first producer of `node` that is not a transparent single-input op (a cat stops the walk)."""
    while is_transparent(node) and node.target != aten.cat.default:
        node = node.args[0]
    return node


def graph_view(gm: GraphModule) -> nx.DiGraph:
    """A networkx DiGraph of the graph's value-computing nodes; transparent ops are contracted into edges.

    Nodes are fx Nodes with attribute `kind` (see node_kind); an edge u -> v means v reads u's values,
    directly or through ops that only move, select or re-type them.
    """
    view = nx.DiGraph()
    for node in gm.graph.nodes:
        if is_transparent(node) or is_metadata(node) or node.op == "output":
            continue
        view.add_node(node, kind=node_kind(node))
        for source in tensor_inputs(node):
            if is_metadata(source):
                continue
            roots = contracted_sources(source)
            for root in roots:
                view.add_edge(root, node)
    return view


def contracted_sources(node: Node) -> list[Node]:
    """The non-transparent nodes whose values reach `node` through transparent ops (cat has several)."""
    if not is_transparent(node):
        return [node]
    sources: list[Node] = []
    inputs = node.args[0] if node.target == aten.cat.default else [node.args[0]]
    for item in inputs:
        for root in contracted_sources(item):
            if root not in sources:
                sources.append(root)
    return sources


# ---------------------------------------------------------------------------------------------------
# Channel codes: which rows of a source reach which channels of which consumer.


def size_hint(value: Any) -> Any:
    """A symbolic size at 1: the codes do not depend on the batch, the only dynamic dimension, and
    the smallest batch keeps the traced tensors small."""
    if not isinstance(value, torch.SymInt):
        return value
    expr = value.node.expr
    return int(expr.subs({symbol: 1 for symbol in expr.free_symbols}))


def concrete_shape(node: Node) -> tuple[int, ...]:
    """The node's shape with the dynamic (batch) dimension at 1."""
    return tuple(size_hint(size) for size in node.meta["val"].shape)


# Codes are float32 (exact integers up to 2^24 rows), so that NaN can mark "no row of the source".
CODE_DTYPE = torch.float32


def unknown_codes(node: Node) -> torch.Tensor:
    """Codes of a tensor the trace did not start from: NaN, 'no row of the source'."""
    return torch.full(concrete_shape(node), torch.nan, dtype=CODE_DTYPE)


def row_codes(shape: tuple[int, ...], row_dims: int) -> torch.Tensor:
    """Codes of `shape` whose last `row_dims` dims enumerate rows 0, 1, ... (row-major)."""
    rows = shape[len(shape) - row_dims:]
    if torch.Size(rows).numel() > 2**24:
        raise ValueError(f"{torch.Size(rows).numel()} rows are too many for exact float32 channel codes")
    codes = torch.arange(torch.Size(rows).numel(), dtype=CODE_DTYPE).reshape(rows)
    return codes.expand(shape)


@dataclass
class Arrival:
    """Codes arriving at a non-transparent node: its argument `position` (index into tensor_inputs)."""

    node: Node
    position: int
    codes: torch.Tensor


def _evaluate(node: Node, env: dict[Node, Any], pass_through: Callable[[Node], bool]) -> Any:
    """Run a transparent op (or a pass-through node) on codes; inputs outside the trace are NaN."""
    if is_identity(node) or pass_through(node):
        first = next(arg for arg in node.args if isinstance(arg, Node))
        return env[first] if first in env else unknown_codes(first)

    def concrete(arg: Any) -> Any:
        if isinstance(arg, Node):
            if arg in env:
                return env[arg]
            value = arg.meta.get("val")
            return unknown_codes(arg) if isinstance(value, torch.Tensor) else size_hint(value)
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
            if node in visited or is_metadata(node):
                continue
            visited.add(node)
            if node.op != "output" and (is_transparent(node) or pass_through(node)):
                env[node] = _evaluate(node, env, pass_through)
                for user in node.users:
                    heapq.heappush(queue, (self.order[user], user))
                continue
            for position, arg in enumerate(tensor_inputs(node)):
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


def contiguous_offset(rows: torch.Tensor | None) -> int | None:
    """o when channel j carries row o + j for every j, else None."""
    if rows is None or bool((rows < 0).any()):
        return None
    offset = int(rows[0])
    return offset if torch.equal(rows, torch.arange(offset, offset + rows.numel())) else None


def rows_of(arrivals: list[Arrival]) -> set[int]:
    rows: set[int] = set()
    for arrival in arrivals:
        values = arrival.codes[~arrival.codes.isnan()]
        rows.update(int(v) for v in values.unique())
    return rows


def layer_name_of(linear: Node) -> str:
    return linear.args[1].target.removesuffix(".weight")


def module_path(node: Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else node.name


def attr_used_only_by(attr: Node, users: set[Node]) -> bool:
    return attr.op == "get_attr" and set(attr.users) <= users




def linear_nodes(gm: GraphModule) -> list[Node]:
    """The graph's linear layers (is_linear), in graph order."""
    return [node for node in gm.graph.nodes if is_linear(node)]


def nodes_by_name(gm: GraphModule) -> dict[str, Node]:
    return {node.name: node for node in gm.graph.nodes}
