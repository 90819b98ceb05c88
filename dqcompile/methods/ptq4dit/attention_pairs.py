"""PTQ4DiT's attention pairs: the value projection(s) of one attention and the output projection(s)
that read the attention output.

Dividing the V rows by b divides the attention output's channels by b (softmax(QK^T) V diag(1/b) =
(softmax(QK^T) V) diag(1/b) per head); the output projections' columns take b. A pair is checked by
tracing channel codes from each V projection through the attention (emulated: every query position
gets the codes of the value channel it mixes) to the output projections.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from dqcompile.graph import (
    ATTENTION,
    CodeTracer,
    attr_used_only_by,
    channel_rows,
    concrete_shape,
    contiguous_offset,
    contracted_sources,
    is_call,
    is_linear,
    layer_name_of,
    row_codes,
    rows_of,
    tensor_inputs,
)

log = logging.getLogger(__name__)


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


def _value_linears(value: Node) -> list[Node] | None:
    """The linears whose outputs make an attention's value through transparent ops, or None."""
    found: list[Node] = []
    for root in contracted_sources(value):
        if not is_linear(root):
            return None
        found.append(root)
    return found


def _emulated_attention(value_codes: torch.Tensor, attention: Node) -> torch.Tensor | None:
    """Codes of an attention's output given its value's: each output channel carries the row of the
    value channel it averages; None when a value channel mixes rows across tokens."""
    out_shape = concrete_shape(attention)
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
        arrivals = tracer.trace(value, row_codes(concrete_shape(value), 1))
        at_value = [a for a in arrivals if a.node is attention and a.position == _value_position(attention, 2)]
        if len(at_value) != 1 or not attr_used_only_by(value.args[1], {value}):
            return None
        output_codes = _emulated_attention(at_value[0].codes, attention)
        if output_codes is None:
            log.debug("%s: value channels of %s mix across tokens", attention.name, value.name)
            return None
        reached = tracer.trace(attention, output_codes)
        if not reached or any(not is_linear(a.node) or a.position != 0 for a in reached):
            log.debug("%s: its output is read by something other than linear layers", attention.name)
            return None
        offset_set = {contiguous_offset(channel_rows(a.codes)) for a in reached}
        if len(offset_set) != 1 or None in offset_set:
            return None
        offset = offset_set.pop()
        width = reached[0].codes.shape[-1]
        if rows_of([a for a in arrivals if a is not at_value[0]]) & set(range(offset, offset + width)):
            log.debug("%s: V rows of %s are also read elsewhere", attention.name, value.name)
            return None
        linears = {a.node for a in reached}
        if not all(attr_used_only_by(node.args[1], linears) for node in linears):
            return None
        names = tuple(dict.fromkeys(layer_name_of(a.node) for a in reached))
        if outputs is not None and names != outputs:
            return None
        outputs = names
        offsets.append(offset)
    return AttentionPair(
        attention=attention.name,
        values=tuple(layer_name_of(v) for v in values),
        value_row_offsets=tuple(offsets),
        outputs=outputs,
    )


def _value_position(node: Node, arg_index: int) -> int:
    """The index in tensor_inputs(node) of node.args[arg_index]."""
    return tensor_inputs(node).index(node.args[arg_index])


def attention_pairs(gm: GraphModule) -> list[AttentionPair]:
    tracer = CodeTracer(gm)
    pairs = []
    for node in gm.graph.nodes:
        if is_call(node) and node.target == ATTENTION:
            pair = _verified_attention_pair(tracer, node)
            if pair is not None:
                pairs.append(pair)
    return pairs
