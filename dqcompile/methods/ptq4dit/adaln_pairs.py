"""PTQ4DiT's adaLN pairs: an adaLN-modulated LayerNorm output and the linears that read it.

Dividing the modulated output h = LN(x) * (1 + scale) + shift by a per-channel vector b is a change
of the scale and shift rows of the adaLN linear (or of PixArt's per-block scale_shift_table);
multiplying the consumers' weight columns by b undoes it (see fold.py).

How they are found. On the networkx view of the graph (dqcompile.graph.graph_view), networkx's
DiGraphMatcher finds every copy of the pattern

    source -> (1 + .) -> mul <- LayerNorm,   mul -> add <- source

where source is the adaLN linear, or the add of a scale_shift_table and a shared embedding (PixArt,
Wan, LTX), and "LayerNorm" is any node (a LayerNorm, an RMSNorm written as x * rsqrt(mean(x^2)),
...): dividing h by b only changes the scale and shift rows, whatever normalised x. A `type_as`
between the modulation and its readers (Wan) passes values through. Nothing is taken from module or
parameter names. Each match is then checked on the real graph by
tracing channel codes (dqcompile.graph.CodeTracer): where the source's row codes arrive says exactly
which rows are the scale and which the shift (the chunk order differs between families: shift first
in DiT, scale first in SD3's AdaLayerNormContinuous), that the LayerNorm's channels reach the mul
unpermuted, and that nothing else reads the rows the fold would change. A candidate that fails a
check is left out, with the reason logged at DEBUG level; a candidate whose readers are known (the
linears the fold would rescale) but that cannot be folded (an adaLN linear without a bias: the
(1 + scale) / b - 1 offset needs one) is kept in `skipped_adaln_pairs` with its reason, for the report.

Pairs whose consumers are the same linears (CogVideoX: the image and the text stream are modulated
separately, then concatenated before the same q/k/v and feed-forward linears) form one group: they
share one balancing vector, each source's rows are divided by it and the consumers' columns are
multiplied by it once (fold.py). Pairs whose consumer sets overlap without being equal cannot share
a vector; they are skipped with that reason.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass

import networkx as nx
import torch
from networkx.algorithms.isomorphism import DiGraphMatcher
from torch.fx import GraphModule, Node

from dqcompile.graph import (
    CodeTracer,
    is_call,
    is_metadata,
    Arrival,
    attr_used_only_by,
    channel_rows,
    concrete_shape,
    contiguous_offset,
    is_add_one,
    is_linear,
    layer_name_of,
    module_path,
    row_codes,
    rows_of,
    through_transparent,
    graph_view,
)

log = logging.getLogger(__name__)

_TYPE_AS = torch.ops.aten.type_as.default
# graph_module.meta key under which adaln_pairs leaves the candidates it skipped (SkippedPair list).
SKIPPED_META = "dqcompile_ptq4dit_skipped"


def _passes_values(node: Node) -> bool:
    """Ops the code trace treats as identity on their first input beyond graph.IDENTITY_OPS: `type_as`
    (a dtype cast to another tensor's dtype: Wan's modulated output)."""
    return is_call(node) and node.target == _TYPE_AS


def _through_modulation(node: Node) -> bool:
    return is_add_one(node) or _passes_values(node)


@dataclass(frozen=True)
class SkippedPair:
    """An adaLN-modulated output PTQ4DiT found but does not balance, and why (shown in the report)."""

    output: str
    consumers: tuple[str, ...]
    reason: str


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


def _pattern() -> nx.DiGraph:
    """adaLN source -> (1 + scale) -> mul(LayerNorm(x)) -> add(shift from the same source)."""
    pattern = nx.DiGraph()
    pattern.add_node("source", kinds={"linear", "add"})
    pattern.add_node("one", kinds={"add_one"})
    pattern.add_node("norm", kinds=None)  # any node: the fold does not depend on what normalised x
    pattern.add_node("mul", kinds={"mul"})
    pattern.add_node("shift", kinds={"add"})
    pattern.add_edges_from([("source", "one"), ("one", "mul"), ("norm", "mul"), ("mul", "shift"), ("source", "shift")])
    return pattern


_PATTERN = _pattern()


def _kind_matches(graph_attrs: dict, pattern_attrs: dict) -> bool:
    return pattern_attrs["kinds"] is None or graph_attrs["kind"] in pattern_attrs["kinds"]


def _modulation_source(gm: GraphModule, source: Node) -> tuple[str, int, int, Node | None, str | None] | None:
    """(adaLN name, rows, row dims, table get_attr or None, why it cannot be folded or None) of a
    pattern's source node, or None when it is no modulation source.

    A linear's rows are its output features; a PixArt source add(table, embedding) has the rows of
    the table parameter, enumerated over the table's shape at the end of the add's output.
    """
    if is_linear(source):
        if not attr_used_only_by(source.args[1], {source}):
            log.debug("adaLN %s: not foldable (its weight is used elsewhere)", source.name)
            return None
        bias = source.args[2] if len(source.args) > 2 else source.kwargs.get("bias")
        unfoldable = None
        if not (isinstance(bias, Node) and bias.op == "get_attr"):
            unfoldable = (f"its adaLN linear {layer_name_of(source)} has no bias, and (1 + scale) / b needs one "
                          "for the constant 1 / b - 1")
        return layer_name_of(source), concrete_shape(source)[-1], 1, None, unfoldable
    for table_arg, embedding_arg in (source.args[:2], source.args[1::-1]):
        table, embedding = through_transparent(table_arg), through_transparent(embedding_arg)
        if table.op != "get_attr" or embedding.op == "get_attr" or not _single_path(table, source):
            continue
        shape = tuple(operator.attrgetter(table.target)(gm).shape)
        while shape and shape[0] == 1:
            shape = shape[1:]
        out_shape = concrete_shape(source)
        if not shape or out_shape[len(out_shape) - len(shape):] != shape:
            return None
        name = layer_name_of(embedding) if is_linear(embedding) else embedding.name
        return name, torch.Size(shape).numel(), len(shape), table, None
    return None


def _single_path(start: Node, end: Node) -> bool:
    """Whether `start` reaches `end` through nodes that each have one user (nothing else reads it)."""
    node = start
    while node is not end:
        users = [user for user in node.users if not is_metadata(user)]  # dtype asserts read no values
        if len(users) != 1:
            return False
        node = users[0]
    return True


def _verified_adaln_pair(gm: GraphModule, tracer: CodeTracer, roles: dict[str, Node]) -> AdaLNPair | SkippedPair | None:
    source, one, norm, mul, shift = (roles[r] for r in ("source", "one", "norm", "mul", "shift"))
    described = _modulation_source(gm, source)
    if described is None:
        return None
    adaln, rows, row_dims, table, unfoldable = described
    width = concrete_shape(norm)[-1]
    if rows % width:
        log.debug("%s: %d source rows are not chunks of the LayerNorm width %d", shift.name, rows, width)
        return None

    source_arrivals = tracer.trace(source, row_codes(concrete_shape(source), row_dims), _through_modulation)
    at_mul = [a for a in source_arrivals if a.node is mul]
    at_shift = [a for a in source_arrivals if a.node is shift]
    if len(at_mul) != 1 or len(at_shift) != 1:
        return None
    scale_offset = contiguous_offset(channel_rows(at_mul[0].codes))
    shift_offset = contiguous_offset(channel_rows(at_shift[0].codes))
    if scale_offset is None or shift_offset is None or scale_offset % width or shift_offset % width:
        log.debug("%s: scale or shift is not one whole chunk of %s", shift.name, adaln)
        return None
    folded_rows = set(range(scale_offset, scale_offset + width)) | set(range(shift_offset, shift_offset + width))
    if rows_of([a for a in source_arrivals if a.node not in (mul, shift)]) & folded_rows:
        log.debug("%s: the scale or shift rows of %s are also read elsewhere", shift.name, adaln)
        return None

    identity = torch.arange(width)
    norm_arrivals = [a for a in tracer.trace(norm, row_codes(concrete_shape(norm), 1), _passes_values) if a.node is mul]
    mul_arrivals = tracer.trace(mul, row_codes(concrete_shape(mul), 1), _passes_values)
    if len(norm_arrivals) != 1 or not _same_rows(norm_arrivals[0], identity):
        return None
    if len(mul_arrivals) != 1 or mul_arrivals[0].node is not shift or not _same_rows(mul_arrivals[0], identity):
        log.debug("%s: the modulated LayerNorm is read by more than its shift", shift.name)
        return None

    consumers = _identity_consumers(tracer, shift, width)
    if consumers is None:
        return None
    if unfoldable is not None:
        return SkippedPair(output=shift.name, consumers=consumers, reason=unfoldable)
    return AdaLNPair(
        output=shift.name,
        norm=module_path(norm) if norm.meta.get("nn_module_stack") else norm.name,
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
    arrivals = tracer.trace(output, row_codes(concrete_shape(output), 1), _passes_values)
    if not arrivals or any(not is_linear(a.node) or a.position != 0 for a in arrivals):
        log.debug("%s: read by something other than linear layers", output.name)
        return None
    if not all(_same_rows(a, torch.arange(width)) for a in arrivals):
        return None
    linears = {a.node for a in arrivals}
    if not all(attr_used_only_by(node.args[1], linears) for node in linears):
        log.debug("%s: a consumer's weight is shared with another layer", output.name)
        return None
    names: list[str] = []
    for arrival in arrivals:
        name = layer_name_of(arrival.node)
        if name not in names:
            names.append(name)
    return tuple(names)


def adaln_pairs(gm: GraphModule) -> list[AdaLNPair]:
    """The foldable adaLN pairs of the graph, in graph order. The candidates found but not foldable
    are left in gm.meta[SKIPPED_META] (see skipped_adaln_pairs)."""
    matcher = DiGraphMatcher(graph_view(gm), _PATTERN, node_match=_kind_matches)
    tracer = CodeTracer(gm)
    found: dict[str, AdaLNPair | SkippedPair] = {}
    for mapping in matcher.subgraph_monomorphisms_iter():
        roles = {role: node for node, role in mapping.items()}
        if roles["shift"].name in found:
            continue
        pair = _verified_adaln_pair(gm, tracer, roles)
        if pair is not None:
            found[pair.output] = pair
    order = {node.name: index for node, index in tracer.order.items()}
    pairs = [p for p in found.values() if isinstance(p, AdaLNPair)]
    skipped = [p for p in found.values() if isinstance(p, SkippedPair)]
    pairs, overlapping = _consistent_groups(pairs)
    gm.meta[SKIPPED_META] = sorted([*skipped, *overlapping], key=lambda pair: order[pair.output])
    return sorted(pairs, key=lambda pair: order[pair.output])


def _consistent_groups(pairs: list[AdaLNPair]) -> tuple[list[AdaLNPair], list[SkippedPair]]:
    """Pairs whose consumer sets are equal or disjoint (equal sets share one vector, see fold.py),
    and the ones whose consumers overlap another pair's without being equal, as skipped."""
    bad: set[str] = set()
    for i, a in enumerate(pairs):
        for b in pairs[i + 1:]:
            shared = set(a.consumers) & set(b.consumers)
            if shared and set(a.consumers) != set(b.consumers):
                bad |= {a.output, b.output}
    kept = [p for p in pairs if p.output not in bad]
    skipped = [
        SkippedPair(p.output, p.consumers, "its consumers are shared, in part only, with another modulated "
                    "output's: one balancing vector cannot serve both")
        for p in pairs if p.output in bad
    ]
    return kept, skipped


def skipped_adaln_pairs(gm: GraphModule) -> list[SkippedPair]:
    """The adaLN candidates the last adaln_pairs(gm) found but did not return, with the reasons."""
    return list(gm.meta.get(SKIPPED_META, ()))
