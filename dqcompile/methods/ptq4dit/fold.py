"""Pass: fold PTQ4DiT's balancing vectors into the weights, so that nothing of them runs at run time.

For a balancing vector b of one pair (docs/methods.md):

- adaLN pair, h = LN(x) * (1 + scale) + shift with scale and shift rows of the adaLN linear:
      shift rows:  W /= b,  bias /= b
      scale rows:  W /= b,  bias = (1 + bias) / b - 1      so that 1 + scale' = (1 + scale) / b
  then h' = h / b, and each consumer's weight columns are multiplied by b: W_c diag(b) h' = W_c h.
- PixArt pair: scale and shift are rows of table + e, with the block's scale_shift_table and an
  embedding e shared by every block, so no change of the table alone divides them by b (e would
  have to shrink too, in this block only). The add is rewritten as addcmul(table', e, u): with
      table'[shift] = table[shift] / b,   table'[scale] = (1 + table[scale]) / b - 1,
      u[shift] = u[scale] = 1 / b   (u = 1 in the other chunks)
  1 + scale' = (1 + table[scale] + e[scale]) / b and shift' = (table[shift] + e[shift]) / b, exactly.
  The fold records this rewrite in the plan (a GraphEdit holding u); the lowering applies it. One
  node replaces one node (the table's unsqueeze goes, u's get_attr comes): the graph has as many
  nodes as before and no extra kernel (addcmul is the add).
- attention pair: the V rows (weight and bias) are divided by b, the output projections' columns
  multiplied by b; softmax(QK^T) V diag(1/b) = (softmax(QK^T) V) diag(1/b) per head.

Adaln pairs whose consumers are the same linears (CogVideoX's image and text streams, modulated
apart and concatenated) are one group: every source of the group is divided by the group's vector
(the first pair's), and the consumers' columns are multiplied by it once.

Folds are computed in float64 and written back in each parameter's dtype, so the folded float32
model matches the original to float32 rounding.
"""

from __future__ import annotations

import operator
import warnings

import torch

from dqcompile.methods.ptq4dit.adaln_pairs import AdaLNPair, skipped_adaln_pairs
from dqcompile.methods.ptq4dit.attention_pairs import AttentionPair
from dqcompile.methods.ptq4dit.balance import BALANCES, PAIRS, pair_key
from dqcompile.methods.ptq4dit.pairs import balanced_layers
from dqcompile.passes.context import PassContext
from dqcompile.plan import GraphEdit
from torch.fx import GraphModule

# Buffer beside a PixArt scale_shift_table holding u (see the module docstring).
EMBEDDING_SCALE_SUFFIX = "_embedding_scale"


def _scaled(tensor: torch.Tensor, factor: torch.Tensor) -> None:
    """tensor *= factor (broadcast), computed in float64, in place."""
    with torch.no_grad():
        tensor.copy_((tensor.double() * factor.double().to(tensor.device)).to(tensor.dtype))


def _fold_scale_shift(rows_of: torch.Tensor, scale: slice, shift: slice, b: torch.Tensor, offset: bool) -> None:
    """Divide chunk rows by b: shift rows plainly; scale rows as (1 + x) / b - 1 when `offset` (bias
    and table rows carry the +1's partner), plainly otherwise (weight rows)."""
    with torch.no_grad():
        b64 = b.double().to(rows_of.device)
        shape = (-1,) + (1,) * (rows_of.dim() - 1)
        rows_of[shift] = (rows_of[shift].double() / b64.reshape(shape)).to(rows_of.dtype)
        if offset:
            rows_of[scale] = ((1 + rows_of[scale].double()) / b64 - 1).to(rows_of.dtype)
        else:
            rows_of[scale] = (rows_of[scale].double() / b64.reshape(shape)).to(rows_of.dtype)


def _chunk_rows(pair: AdaLNPair, width: int) -> tuple[slice, slice]:
    """The source rows of the scale chunk and of the shift chunk."""
    return (
        slice(pair.scale_chunk * width, (pair.scale_chunk + 1) * width),
        slice(pair.shift_chunk * width, (pair.shift_chunk + 1) * width),
    )


def _fold_adaln(gm: GraphModule, ctx: PassContext, pair: AdaLNPair, b: torch.Tensor) -> None:
    scale, shift = _chunk_rows(pair, b.numel())
    plan = ctx.plan.layers[pair.adaln]
    if plan.bias_name is None:
        raise ValueError(f"PTQ4DiT cannot fold into {pair.adaln}: it has no bias")
    _fold_scale_shift(gm.get_parameter(plan.weight_name), scale, shift, b, offset=False)
    _fold_scale_shift(gm.get_parameter(plan.bias_name), scale, shift, b, offset=True)


def _embedding_scale(gm: GraphModule, ctx: PassContext, pair: AdaLNPair) -> torch.Tensor:
    """u of a PixArt table (see the module docstring): one GraphEdit per table, made the first time."""
    for edit in ctx.plan.edits:
        if edit.node_name == pair.table_add:
            return edit.tensor
    table = operator.attrgetter(pair.table)(gm)
    edit = GraphEdit(kind="embedding_scale", node_name=pair.table_add, buffer=pair.table + EMBEDDING_SCALE_SUFFIX,
                     table=pair.table, tensor=torch.ones_like(table, requires_grad=False))
    ctx.plan.edits.append(edit)
    return edit.tensor


def _fold_table(gm: GraphModule, ctx: PassContext, pair: AdaLNPair, b: torch.Tensor) -> None:
    u = _embedding_scale(gm, ctx, pair)
    table = operator.attrgetter(pair.table)(gm)
    scale, shift = _chunk_rows(pair, b.numel())
    # Flattened, the table's rows are the chunks one after the other, like an adaLN linear's bias.
    _fold_scale_shift(table.data.view(-1), scale, shift, b, offset=True)
    _fold_scale_shift(u.view(-1), scale, shift, b, offset=False)


def _fold_values(gm: GraphModule, ctx: PassContext, pair: AttentionPair, b: torch.Tensor) -> None:
    rows = b.numel()
    for name, offset in zip(pair.values, pair.value_row_offsets):
        plan = ctx.plan.layers[name]
        value_rows = slice(offset, offset + rows)
        _scaled(gm.get_parameter(plan.weight_name)[value_rows], 1 / b.double()[:, None])
        if plan.bias_name is not None:
            _scaled(gm.get_parameter(plan.bias_name)[value_rows], 1 / b.double())
        plan.rescaled_for = pair.outputs


def fold_balancing(gm: GraphModule, ctx: PassContext) -> None:
    """Needs: salience_balance (ctx.annotations) and the pairs of find_balance_pairs.

    Guarantees: for every pair, its balancing vector b is folded as the module docstring says (in
    the graph module's own parameters; the user's model is untouched; PixArt's table rewrite is a
    GraphEdit of the plan, which the lowering applies); the lowered graph computes what the float
    graph computed, up to float rounding. The calibration records of the balanced layers now
    describe their balanced inputs X / b (ctx.input_stats; ctx.hessians as diag(1/b) H diag(1/b)),
    so static activation parameters and GPTQ come out right; each balanced layer's plan carries a
    note naming its balancing, and each V layer whose output channels the fold divided names the
    output projections that read them (rescaled_for).
    """
    method = "CSB+SSC" if ctx.spec.options.ssc else "CSB"
    balances = ctx.annotations[BALANCES]
    layers = ctx.plan.layers
    folded: dict[frozenset[str], torch.Tensor] = {}  # consumer set -> the vector its columns carry
    for pair in ctx.annotations[PAIRS]:
        group = frozenset(balanced_layers(pair))
        b = folded.get(group, balances[pair_key(pair)].vector)
        if isinstance(pair, AdaLNPair):
            if pair.table is None:
                _fold_adaln(gm, ctx, pair, b)
                source = f"{pair.adaln} (scale chunk {pair.scale_chunk}, shift chunk {pair.shift_chunk})"
            else:
                _fold_table(gm, ctx, pair, b)
                source = f"{pair.table} (rows {pair.scale_chunk}, {pair.shift_chunk}) and {pair.adaln}"
        else:
            _fold_values(gm, ctx, pair, b)
            source = f"the V rows of {', '.join(pair.values)}"
            for name in pair.values:
                layers[name].notes.append(f"V rows carry the {method} balancing of {', '.join(pair.outputs)}")
        if group in folded:  # a second source of the same consumers: their columns already carry b
            for name in balanced_layers(pair):
                layers[name].notes.append(f"{method} vector shared with {source}")
            continue
        folded[group] = b
        for name in balanced_layers(pair):
            plan = layers[name]
            _scaled(gm.get_parameter(plan.weight_name), b[None, :])
            if name in ctx.input_stats:
                ctx.input_stats[name] = {t: s.scaled(b) for t, s in ctx.input_stats[name].items()}
            if name in ctx.hessians:
                inverse = (1 / b.double()).to(ctx.hessians[name].device)
                ctx.hessians[name] = (ctx.hessians[name].double() * inverse[:, None] * inverse[None, :]).float()
            plan.notes.append(f"{method} balanced with {source}")
    _note_skipped(gm, ctx)


def _note_skipped(gm: GraphModule, ctx: PassContext) -> None:
    """Say in the report where PTQ4DiT did not balance: each skipped adaLN candidate's quantized
    consumers carry the reason; when nothing at all was balanced, every quantized layer says so (and a
    warning tells the caller)."""
    layers = ctx.plan.layers
    for skipped in skipped_adaln_pairs(gm):
        for name in skipped.consumers:
            if name in layers and layers[name].quantized:
                layers[name].notes.append(f"PTQ4DiT: not balanced: {skipped.reason}")
    if ctx.annotations[PAIRS]:
        return
    reason = ("no adaLN-modulated output read only by linears and no V -> output projection pair was found"
              if not skipped_adaln_pairs(gm) else "every candidate was skipped (see the notes)")
    ctx.plan.summary["ptq4dit"] = f"balanced nothing: {reason}"
    for plan in ctx.plan.quantized_layers():
        if not any(note.startswith("PTQ4DiT") for note in plan.notes):
            plan.notes.append(f"PTQ4DiT balanced nothing in this model: {reason}; rounding only")
    warnings.warn(f"PTQ4DiT balanced nothing in this model: {reason}; the result is plain rounding", stacklevel=2)
