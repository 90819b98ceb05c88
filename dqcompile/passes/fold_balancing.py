"""Pass: fold PTQ4DiT's balancing vectors into the weights, so that nothing of them runs at run time.

For a balancing vector b of one pair (METHODS.md):

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
  One node replaces one node (the table's unsqueeze goes, u's get_attr comes): the graph has as
  many nodes as before and no extra kernel (addcmul is the add).
- attention pair: the V rows (weight and bias) are divided by b, the output projections' columns
  multiplied by b; softmax(QK^T) V diag(1/b) = (softmax(QK^T) V) diag(1/b) per head.

Folds are computed in float64 and written back in each parameter's dtype, so the folded float32
model matches the original to float32 rounding.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

from dqcompile.passes.context import ChannelStats, PassContext
from dqcompile.passes.find_adaln_pairs import (
    AdaLNPair,
    AttentionPair,
    _through_transparent,
    balanced_layers,
    iter_pairs,
)
from dqcompile.passes.salience_balance import ANNOTATION as BALANCES
from dqcompile.passes.salience_balance import pair_key

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
    plan = ctx.layers[pair.adaln]
    _fold_scale_shift(gm.get_parameter(plan.weight_name), scale, shift, b, offset=False)
    _fold_scale_shift(gm.get_parameter(plan.bias_name), scale, shift, b, offset=True)


def _embedding_scale(gm: GraphModule, pair: AdaLNPair) -> torch.Tensor:
    """u of a PixArt table (see the module docstring): rewrites the table's add the first time."""
    owner_path, _, leaf = pair.table.rpartition(".")
    owner = gm.get_submodule(owner_path)
    name = leaf + EMBEDDING_SCALE_SUFFIX
    if hasattr(owner, name):
        return getattr(owner, name)
    table = getattr(owner, leaf)
    owner.register_buffer(name, torch.ones_like(table, requires_grad=False))
    add = next(node for node in gm.graph.nodes if node.name == pair.table_add)
    table_arg, embedding = add.args[:2] if _through_transparent(add.args[0]).op == "get_attr" else add.args[1::-1]
    table_node = _through_transparent(table_arg)
    with gm.graph.inserting_before(add):
        scale_node = gm.graph.get_attr(f"{pair.table}{EMBEDDING_SCALE_SUFFIX}")
        # The table has the add's trailing shape, so it broadcasts without the unsqueeze it had.
        addcmul = gm.graph.call_function(torch.ops.aten.addcmul.default, (table_node, embedding, scale_node))
    addcmul.meta.update(add.meta)
    add.replace_all_uses_with(addcmul)
    gm.graph.erase_node(add)
    node: Node = table_arg
    while node is not table_node and not node.users:
        producer = node.args[0]
        gm.graph.erase_node(node)
        node = producer
    return getattr(owner, name)


def _fold_table(gm: GraphModule, pair: AdaLNPair, b: torch.Tensor) -> None:
    u = _embedding_scale(gm, pair)
    table = operator.attrgetter(pair.table)(gm)
    scale, shift = _chunk_rows(pair, b.numel())
    # Flattened, the table's rows are the chunks one after the other, like an adaLN linear's bias.
    _fold_scale_shift(table.data.view(-1), scale, shift, b, offset=True)
    _fold_scale_shift(u.view(-1), scale, shift, b, offset=False)


def _fold_values(gm: GraphModule, ctx: PassContext, pair: AttentionPair, b: torch.Tensor) -> None:
    rows = b.numel()
    for name, offset in zip(pair.values, pair.value_row_offsets):
        plan = ctx.layers[name]
        value_rows = slice(offset, offset + rows)
        _scaled(gm.get_parameter(plan.weight_name)[value_rows], 1 / b.double()[:, None])
        if plan.bias_name is not None:
            _scaled(gm.get_parameter(plan.bias_name)[value_rows], 1 / b.double())


def _balanced_stats(stats: dict[float, ChannelStats], b: torch.Tensor) -> dict[float, ChannelStats]:
    """The statistics of X / b from those of X (b > 0 keeps min and max in place)."""
    return {
        t: ChannelStats(absmax=s.absmax / b.to(s.absmax), minimum=s.minimum / b.to(s.minimum),
                        maximum=s.maximum / b.to(s.maximum), rows=s.rows)
        for t, s in stats.items()
    }


def fold_balancing(gm: GraphModule, ctx: PassContext) -> None:
    """Needs: salience_balance (ctx.annotations) and the pairs of analyze_balance_pairs.

    Guarantees: for every pair, its balancing vector b is folded as the module docstring says (in
    the graph module's own parameters; the user's model is untouched); the graph computes what it
    computed before, up to float rounding, with no more nodes. The calibration statistics of the
    balanced layers (ctx.input_stats) now describe their balanced inputs X / b, so static activation
    parameters come out right; each balanced layer's plan carries a note naming its balancing.
    """
    method = "CSB+SSC" if ctx.spec.ptq4dit.ssc else "CSB"
    balances = ctx.annotations.get(BALANCES, {})
    for pair in iter_pairs(ctx):
        b = balances[pair_key(pair)].vector
        if isinstance(pair, AdaLNPair):
            if pair.table is None:
                _fold_adaln(gm, ctx, pair, b)
                source = f"{pair.adaln} (scale chunk {pair.scale_chunk}, shift chunk {pair.shift_chunk})"
            else:
                _fold_table(gm, pair, b)
                source = f"{pair.table} (rows {pair.scale_chunk}, {pair.shift_chunk}) and {pair.adaln}"
        else:
            _fold_values(gm, ctx, pair, b)
            source = f"the V rows of {', '.join(pair.values)}"
            for name in pair.values:
                ctx.layers[name].notes.append(f"V rows carry the {method} balancing of {', '.join(pair.outputs)}")
        for name in balanced_layers(pair):
            plan = ctx.layers[name]
            _scaled(gm.get_parameter(plan.weight_name), b[None, :])
            if name in ctx.input_stats:
                ctx.input_stats[name] = _balanced_stats(ctx.input_stats[name], b)
            plan.notes.append(f"{method} balanced with {source}")
    gm.recompile()
