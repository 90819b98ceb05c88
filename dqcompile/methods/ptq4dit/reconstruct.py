"""PTQ4DiT's block reconstruction: BRECQ-style block output matching with AdaRound-style learned rounding.

After the balancing is folded into the weights, each transformer block's quantized linears get their
rounding (up or down, per weight) learned so that the block's quantized output matches the float
block's over the calibration set, instead of each weight rounding to its nearest code on its own.

Blocks. A block is the quantized linears of one repeated module: the outermost module in a linear's
`nn_module_stack` whose path ends in an index (`transformer_blocks.3`, `blocks.0`) and whose class
appears at two indices or more under the same parent. Nothing is taken from names: any ModuleList of
identical blocks qualifies. A block's *segment* is the run of graph nodes from its first node up to
the next block's first node (the last block's ends at its last node); its inputs are the values
computed before the segment and read inside it or later (the frontier), its outputs the values it
computes that are read after it. Quantized linears outside every block (or shared between blocks)
keep round-to-nearest, with a note.

For block i, over the calibration samples (BRECQ, AdaRound):
- targets: the float block's outputs on the float model's inputs to it;
- inputs: the quantized model's inputs to it (blocks before it already rounded as learned, so each
  block can correct what the ones before left; options.inputs="float" takes the float inputs);
- each quantized weight W with its round-to-nearest scales s (per channel or group, with the spec's
  clip search) is written W~ = s clamp(floor(W / s) + h(V), qmin, qmax), h(V) = clamp(sigmoid(V) 1.2
  - 0.1, 0, 1), V initialised so that W~ = W (AdaRound's rectified sigmoid);
- activations are quantized as the plan says (static per tensor from the calibration statistics, or
  dynamic per token / group / sample, the reference quantizers' formulas), straight-through in the
  backward pass;
- loss = ||block_q - block_fp||^2 / E_rtn + regularization * mean(1 - |2 h(V) - 1|^beta), where
  E_rtn is the block's output error with round-to-nearest weights on the whole calibration set, so
  the loss is 1 at round to nearest whatever the model's scale; the rounding term starts after
  `warmup` of the iterations with beta annealed from beta_start to beta_end (AdaRound), which drives
  every h to 0 or 1;
- Adam on V, `iterations` steps of `batch_size` calibration rows drawn at random from all timesteps;
- the learned rounding (floor + [V >= 0]) is kept only when the block's output error on the whole
  calibration set is below round to nearest's; otherwise the block keeps round to nearest (noted).

Every quantized layer of a reconstructed block gets its WeightPlan from `set_rounded(..., "adaround")`
and a note with the block's output error before and after; ctx.plan.summary["ptq4dit.reconstruction"]
holds the time, the peak memory and each block's errors.

The graph is run here node by node (as the calibration runner does), because each block's inputs
depend on how the blocks before it were rounded: the reconstruction cannot be one probe run.
"""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.fx import GraphModule, Node
from torch.fx._pytree import tree_flatten_spec
from torch.fx.node import map_arg

from dqcompile.backends import reference
from dqcompile.calib.runner import check_finite
from dqcompile.graph import through_transparent
from dqcompile.passes.context import PassContext
from dqcompile.passes.static_activation_params import static_activation_params
from dqcompile.plan import LayerPlan
from dqcompile.quant import QParams, dequantize, pack_int4, quantize_weight
from dqcompile.quant.uniform import qrange
from dqcompile.spec import check_field_types

SUMMARY = "ptq4dit.reconstruction"
ROUNDING = "adaround"
# AdaRound's rectified sigmoid stretch: h = clamp(sigmoid(V) (ZETA - GAMMA) + GAMMA, 0, 1).
ZETA, GAMMA = 1.1, -0.1
INPUT_MODES = ("quantized", "float")
PACKED_BITS = 4


@dataclass(frozen=True)
class ReconstructionOptions:
    """Block reconstruction of the PTQ4DiT weights (PTQ4DiTOptions.reconstruction); off by default.

    iterations: Adam steps per block. learning_rate: Adam's, on AdaRound's V. batch_size: calibration
        rows per step, drawn at random over every calibration timestep.
    regularization: weight of the rounding term against the output error (normalised to 1 at round to
        nearest). warmup: share of the iterations before the rounding term starts. beta_start,
        beta_end: its annealed exponent.
    inputs: "quantized" (each block sees the quantized model's inputs, BRECQ / AdaRound's asymmetric
        reconstruction) or "float" (the float model's).
    seed: the draw of the rows.
    The defaults and why: docs/ptq4dit.md, "Block reconstruction".
    """

    enabled: bool = False
    iterations: int = 1000
    learning_rate: float = 0.03
    batch_size: int = 32
    regularization: float = 1e4
    warmup: float = 0.2
    beta_start: float = 20.0
    beta_end: float = 2.0
    inputs: Literal["quantized", "float"] = "quantized"
    seed: int = 0

    def __post_init__(self) -> None:
        check_field_types(self, "options.reconstruction.")
        for name in ("iterations", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"options.reconstruction.{name}={getattr(self, name)!r} must be a positive integer")
        if not self.learning_rate > 0:
            raise ValueError(f"options.reconstruction.learning_rate={self.learning_rate!r} must be positive")
        if self.regularization < 0:
            raise ValueError(f"options.reconstruction.regularization={self.regularization!r} must be >= 0")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"options.reconstruction.warmup={self.warmup!r} must be in [0, 1)")
        if not self.beta_start >= self.beta_end > 0:
            raise ValueError("options.reconstruction needs beta_start >= beta_end > 0, got "
                             f"{self.beta_start!r} and {self.beta_end!r}")


# ------------------------------------------------------------------------------------------ blocks

@dataclass
class Block:
    """One repeated module's quantized linears and the graph segment that computes it.

    path: the module path (`transformer_blocks.3`). layers: the quantized layers reconstructed with it.
    nodes: the segment's nodes in graph order. inputs: values computed before the segment and read in
    it or later. outputs: floating-point tensors computed in the segment and read after it.
    """

    path: str
    layers: list[str]
    nodes: list[Node]
    inputs: list[Node] = field(default_factory=list)
    outputs: list[Node] = field(default_factory=list)


def _stack_paths(node: Node) -> list[tuple[str, str]]:
    return [(path, cls) for path, cls in (node.meta.get("nn_module_stack") or {}).values() if isinstance(path, str)]


def _indexed(path: str) -> tuple[str, int] | None:
    parent, _, last = path.rpartition(".")
    return (parent, int(last)) if parent and last.isdigit() else None


def block_paths(gm: GraphModule, plan_layers: Sequence[LayerPlan]) -> dict[str, str]:
    """Quantized layer name -> the path of its block (see the module docstring); layers in no block
    are absent. A layer whose linear nodes sit in different blocks (a shared weight) is absent too."""
    nodes = {node.name: node for node in gm.graph.nodes}
    stacks = {layer.name: [_stack_paths(nodes[name]) for name in layer.node_names] for layer in plan_layers}
    indices: dict[tuple[str, str], set[int]] = {}
    for per_node in stacks.values():
        for stack in per_node:
            for path, cls in stack:
                indexed = _indexed(path)
                if indexed is not None:
                    indices.setdefault((indexed[0], cls), set()).add(indexed[1])
    repeated = {key for key, found in indices.items() if len(found) >= 2}
    result = {}
    for name, per_node in stacks.items():
        found = set()
        for stack in per_node:
            outer = next((path for path, cls in stack
                          if _indexed(path) is not None and (_indexed(path)[0], cls) in repeated), None)
            found.add(outer)
        if len(found) == 1 and None not in found:
            result[name] = found.pop()
    return result


def find_blocks(gm: GraphModule, ctx: PassContext) -> tuple[list[Block], list[str]]:
    """The blocks to reconstruct, in graph order, and the quantized layers left out of every block."""
    quantized = ctx.plan.quantized_layers()
    owner = block_paths(gm, quantized)
    order = [node for node in gm.graph.nodes if node.op in ("call_function", "call_module")]
    position = {node: index for index, node in enumerate(order)}

    def in_block(node: Node, path: str) -> bool:
        return any(p == path or p.startswith(path + ".") for p, _ in _stack_paths(node))

    paths = list(dict.fromkeys(owner[layer.name] for layer in quantized if layer.name in owner))
    members = {path: [node for node in order if in_block(node, path)] for path in paths}
    paths.sort(key=lambda path: position[members[path][0]])
    blocks = []
    for i, path in enumerate(paths):
        layers = [layer.name for layer in quantized if owner.get(layer.name) == path]
        linears = [position[node] for node in order
                   if node.name in {n for name in layers for n in ctx.plan.layers[name].node_names}]
        start = position[members[path][0]]
        if i + 1 < len(paths):
            stop = position[members[paths[i + 1]][0]]
        else:  # the last block ends where its own nodes stop, after its last linear
            stop = max(linears) + 1
            while stop < len(order) and in_block(order[stop], path):
                stop += 1
        # A module called again later (diffusers DiT reuses block 0's embedder for its final layer)
        # leaves nodes outside the segment: they run as the rest of the graph does.
        if max(linears) >= stop:
            raise ValueError(f"block reconstruction: the linears of {path} and {paths[i + 1]} interleave in the graph; "
                             "blocks must run one after the other")
        blocks.append(Block(path, layers, order[start:stop]))
    outside = [layer.name for layer in quantized if layer.name not in owner]
    _connect(gm, blocks, position)
    return blocks, outside


def _connect(gm: GraphModule, blocks: list[Block], position: dict[Node, int]) -> None:
    """Each block's inputs and outputs (see Block)."""
    end = len(position) + 1
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]

    def pos(node: Node) -> int:
        return end if node.op == "output" else position.get(node, -1)

    for block in blocks:
        first, after = position[block.nodes[0]], position[block.nodes[-1]] + 1
        candidates = placeholders + [node for node, p in position.items() if p < after]
        block.inputs = [node for node in candidates if pos(node) < first and any(pos(u) >= first for u in node.users)]
        block.outputs = [node for node in block.nodes
                         if any(pos(u) >= after for u in node.users) and _is_float_tensor(node.meta.get("val"))]


def _is_float_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point()


# ------------------------------------------------------------------------------------------ running segments

class _Runner:
    """Evaluates graph nodes from an environment, replacing the quantized linears' computation."""

    def __init__(self, gm: GraphModule, ctx: PassContext) -> None:
        self.gm = gm
        self.attrs: dict[str, Any] = {}
        self.edits = {edit.node_name: edit for edit in ctx.plan.edits}

    def attr(self, target: str) -> Any:
        if target not in self.attrs:
            owner = self.gm
            for part in target.split("."):
                owner = getattr(owner, part)
            self.attrs[target] = owner
        return self.attrs[target]

    def run(self, nodes: Sequence[Node], env: dict[Node, Any],
            linear: Callable[[Node, tuple], Tensor] | None = None) -> dict[Node, Any]:
        def fetch(arg: Node) -> Any:
            return self.attr(arg.target) if arg.op == "get_attr" else env[arg]

        for node in nodes:
            args = map_arg(node.args, fetch)
            kwargs = map_arg(node.kwargs, fetch)
            if linear is not None and node.op == "call_function" and (value := linear(node, args)) is not None:
                env[node] = value
            elif node.name in self.edits:
                env[node] = self._embedding_scale(node, args)
            elif node.op == "call_module":
                env[node] = self.attr(node.target)(*args, **kwargs)
            else:
                env[node] = node.target(*args, **kwargs)
        return env

    def _embedding_scale(self, node: Node, args: tuple) -> Tensor:
        """PixArt's folded table add, as the lowering will rewrite it: table + embedding * u."""
        edit = self.edits[node.name]
        u = edit.tensor  # registered on the graph module only by the lowering
        table_first = through_transparent(node.args[0]).op == "get_attr"
        table, embedding = (args[0], args[1]) if table_first else (args[1], args[0])
        return table + embedding * u.to(embedding)


def _graph_inputs(gm: GraphModule, ctx: PassContext, sample: dict[str, Any], index: int) -> dict[Node, Any]:
    check_finite(sample, index)
    inputs, _ = ctx.binding.graph_kwargs((), dict(sample), sample_index=index)
    flat = tree_flatten_spec(((), dict(inputs)), gm._in_spec)
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    return dict(zip(placeholders, flat))


# ------------------------------------------------------------------------------------------ batching rows

class _Rows:
    """A block's inputs (or targets) for every calibration call, and minibatches of rows drawn from them.

    Batch-major values (tensors whose dim 0 is the graph's batch, and sizes that depend on it) are
    gathered row by row across calls; other values are the same in every call and taken from the first.
    When some value is neither, minibatches are whole calls.
    """

    def __init__(self, nodes: Sequence[Node], calls: list[dict[Node, Any]], batch_symbol: Any) -> None:
        self.nodes, self.calls, self.symbol = list(nodes), calls, batch_symbol
        self.kinds = {node: _value_kind(node.meta.get("val"), batch_symbol) for node in self.nodes}
        self.batch_major = batch_symbol is not None and all(kind is not None for kind in self.kinds.values())
        self.sizes = [_call_rows(call, self.nodes, self.kinds) for call in calls]
        self.size_cache: dict[tuple[Node, int], int] = {}
        self.starts = [0]
        for size in self.sizes:
            self.starts.append(self.starts[-1] + size)

    @property
    def total(self) -> int:
        return self.starts[-1]

    def select(self, count: int, generator: torch.Generator) -> Any:
        """A random minibatch: `count` rows over all calls (batch-major), else one whole call."""
        if not self.batch_major:
            return int(torch.randint(len(self.calls), (1,), generator=generator))
        rows = torch.randperm(self.total, generator=generator)[: min(count, self.total)].sort().values
        call_of = torch.searchsorted(torch.tensor(self.starts[1:]), rows, right=True)
        return [(int(c), rows[call_of == c] - self.starts[int(c)]) for c in call_of.unique()]

    def values(self, selection: Any) -> dict[Node, Any]:
        """The values of a minibatch `select` chose (the same selection serves inputs and targets)."""
        if isinstance(selection, int):
            return dict(self.calls[selection])
        count = sum(len(local) for _, local in selection)
        env = {}
        for node in self.nodes:
            kind = self.kinds[node]
            if kind == "const":
                env[node] = self.calls[0][node]
            elif kind == "size":
                key = (node, count)
                if key not in self.size_cache:
                    self.size_cache[key] = int(node.meta["val"].node.expr.subs(self.symbol, count))
                env[node] = self.size_cache[key]
            else:
                env[node] = _gather([self.calls[c][node] for c, _ in selection], [local for _, local in selection])
        return env


def _gather(values: list[Any], rows: list[Tensor]) -> Any:
    first = values[0]
    if isinstance(first, torch.Tensor):
        return torch.cat([value[local.to(value.device)] for value, local in zip(values, rows)])
    return type(first)(_gather([value[i] for value in values], rows) for i in range(len(first)))


def _value_kind(val: Any, symbol: Any) -> str | None:
    """'batch' (dim 0 is the batch, no other dim symbolic), 'size' (an integer of the batch alone),
    'const' (nothing depends on the batch), or None (batched otherwise: minibatches are whole calls)."""
    if symbol is None:
        return None
    if isinstance(val, torch.SymInt):
        return "size" if val.node.expr.free_symbols <= {symbol} else None
    if isinstance(val, torch.Tensor):
        symbolic = [isinstance(d, torch.SymInt) for d in val.shape]
        if not any(symbolic):
            return "const"
        if val.dim() and symbolic[0] and not any(symbolic[1:]) and val.shape[0].node.expr == symbol:
            return "batch"
        return None
    if isinstance(val, (list, tuple)) and val:
        kinds = {_value_kind(item, symbol) for item in val}
        return kinds.pop() if len(kinds) == 1 and kinds <= {"batch", "const"} else None
    if val is None or isinstance(val, (bool, int, float, str, torch.dtype, torch.device)):
        return "const"
    return None


def _call_rows(call: dict[Node, Any], nodes: Sequence[Node], kinds: dict[Node, str | None]) -> int:
    for node in nodes:
        if kinds[node] == "batch":
            value = call[node]
            return int((value[0] if isinstance(value, (list, tuple)) else value).shape[0])
    return 1


def _batch_symbol(gm: GraphModule) -> Any:
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        if node.op == "placeholder" and isinstance(val, torch.Tensor) and val.dim() and isinstance(val.shape[0], torch.SymInt):
            return val.shape[0].node.expr
    return None


# ------------------------------------------------------------------------------------------ quantizers

class _LayerQuantizer:
    """One quantized linear of a block: its activation quantizer and its weight's learnable rounding."""

    def __init__(self, plan: LayerPlan, weight: Tensor, device: torch.device) -> None:
        self.plan = plan
        self.bits, self.group_size = plan.weight.bits, plan.weight.group_size
        w = weight.detach().float().to(device)
        rtn = quantize_weight(w, self.bits, group_size=self.group_size, clip_search=plan.weight.clip_search,
                              unit_gain=plan.weight.clip_unit_gain)
        self.scale = rtn.scale  # [N, G]
        n, k = w.shape
        groups = self.scale.shape[1]
        grouped = w.reshape(n, groups, k // groups) / self.scale[:, :, None]
        self.floor = grouped.floor()
        rest = (grouped - self.floor).clamp(1e-4, 1 - 1e-4)
        self.v = torch.nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))  # h(V) = rest
        self.rtn_codes = rtn.codes().float().reshape(self.floor.shape)
        self.qmin, self.qmax = qrange(self.bits, symmetric=True)
        self.shape = (n, k)
        self.mode = "rtn"
        self.activation = plan.activations
        if self.activation.kind == "static":
            self.activation_tensors = {name: t.to(device) for name, t in self.activation.tensors.items()}

    def h(self) -> Tensor:
        return torch.clamp(torch.sigmoid(self.v) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def codes(self, mode: str) -> Tensor:
        if mode == "rtn":
            return self.rtn_codes
        if mode == "soft":
            return torch.clamp(self.floor + self.h(), self.qmin, self.qmax)
        return torch.clamp(self.floor + (self.v >= 0).float(), self.qmin, self.qmax)

    def weight(self) -> Tensor:
        return (self.codes(self.mode) * self.scale[:, :, None]).reshape(self.shape)

    def regularization(self, beta: float) -> Tensor:
        return (1 - (2 * self.h() - 1).abs().pow(beta)).mean()

    def quantize_input(self, x: Tensor) -> Tensor:
        """x with the plan's activation quantizer applied (straight-through gradient)."""
        act = self.activation
        if act.kind == "float":
            return x
        with torch.no_grad():
            flat = x.detach().float()
            if act.kind in ("dynamic_token", "dynamic_group"):
                q, scale, zero = reference.quantize_act(flat, act.bits, act.group_size, act.symmetric)
                qp = QParams(scale=scale, zero=zero, bits=act.bits, symmetric=act.symmetric, group_size=act.group_size)
            elif act.kind == "dynamic_sample_group":
                q, scale, zero = reference.quantize_act_per_sample(flat, act.bits, act.group_size, act.symmetric)
                qp = QParams(scale=scale, zero=zero, bits=act.bits, symmetric=act.symmetric, group_size=act.group_size)
            elif act.kind == "static" and not act.time_grouped:
                scale, zero = self.activation_tensors["scale"], self.activation_tensors["zero"]
                q = reference.quantize_act_static(flat, scale, zero, act.bits)
                qp = QParams(scale=scale.reshape(1), zero=zero.reshape(1), bits=act.bits, symmetric=False, group_size=0)
            else:
                raise ValueError(f"layer {self.plan.name}: block reconstruction does not model activation "
                                 f"quantizer {act.kind!r}{' per time group' if act.time_grouped else ''}")
            error = dequantize(q, qp).to(x.dtype) - x.detach()
        return x + error

    def final(self) -> tuple[Tensor, Tensor]:
        """(qweight, scale) of the rounding chosen (self.mode: "hard" or "rtn")."""
        codes = self.codes(self.mode).reshape(self.shape).to(torch.int8)
        return (pack_int4(codes) if self.bits == PACKED_BITS else codes), self.scale


def _linear_override(quantizers: dict[str, _LayerQuantizer]) -> Callable[[Node, tuple], Tensor | None]:
    def linear(node: Node, args: tuple) -> Tensor | None:
        quantizer = quantizers.get(node.name)
        if quantizer is None:
            return None
        x = args[0]
        bias = args[2] if len(args) > 2 else None
        x_hat = quantizer.quantize_input(x)
        out = F.linear(x_hat.float(), quantizer.weight(), None if bias is None else bias.float())
        return out.to(x.dtype)

    return linear


# ------------------------------------------------------------------------------------------ the pass

def _squared_error(outputs: Sequence[Tensor], targets: Sequence[Tensor]) -> tuple[Tensor, int]:
    total = sum(((o.float() - t.float()) ** 2).sum() for o, t in zip(outputs, targets))
    return total, sum(t.numel() for t in targets)


def _peak_memory_mib(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "torch.cuda.max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10, "process peak RSS"


def reconstruct_blocks(gm: GraphModule, ctx: PassContext) -> None:
    """Needs: the fold (fold_balancing: the graph module's weights are the balanced ones) and the
    calibration statistics of the static layers. Acts when options.reconstruction.enabled.

    Guarantees: every quantized layer of every block (see the module docstring) has its weight
    rounded, by "adaround" or, in a block where learned rounding did not lower the block's output error
    on the calibration set, by round to nearest (noted); static activation plans hold their
    parameters (static_activation_params, which the pipeline would run next). ctx.plan.summary[SUMMARY]
    records the blocks' errors, the time and the peak memory. The graph and its parameters are not
    changed.
    """
    options = ctx.spec.options.reconstruction
    if not options.enabled:
        return
    samples = ctx.require_calibration("PTQ4DiT block reconstruction")
    started = time.perf_counter()
    device = next(gm.parameters()).device
    static_activation_params(gm, ctx)  # the static quantizers the blocks are reconstructed with
    blocks, outside = find_blocks(gm, ctx)
    runner = _Runner(gm, ctx)
    symbol = _batch_symbol(gm)
    generator = torch.Generator().manual_seed(options.seed)
    summary: dict[str, Any] = {"blocks": [], "options": {k: getattr(options, k) for k in options.__dataclass_fields__}}

    with torch.no_grad():
        stem = [node for node in gm.graph.nodes if node.op in ("call_function", "call_module")]
        stem = stem[: stem.index(blocks[0].nodes[0])] if blocks else []
        fp_calls = []
        for index, sample in enumerate(samples):
            env = runner.run(stem, _graph_inputs(gm, ctx, sample, index))
            fp_calls.append({node: env[node] for node in blocks[0].inputs} if blocks else {})
    q_calls = fp_calls

    for block in blocks:
        block_started = time.perf_counter()
        quantizers = {}
        for name in block.layers:
            plan = ctx.plan.layers[name]
            quantizer = _LayerQuantizer(plan, gm.get_parameter(plan.weight_name), device)
            for node_name in plan.node_names:
                quantizers[node_name] = quantizer
        layers = list(dict.fromkeys(quantizers.values()))
        linear = _linear_override(quantizers)
        next_inputs = blocks[blocks.index(block) + 1].inputs if block is not blocks[-1] else []

        with torch.no_grad():
            targets, fp_next = [], []
            for call in fp_calls:
                env = runner.run(block.nodes, dict(call))
                targets.append({node: env[node] for node in block.outputs})
                fp_next.append({node: env[node] for node in next_inputs})

            def evaluate(mode: str, calls: list[dict[Node, Any]]) -> tuple[float, list[dict[Node, Any]]]:
                for quantizer in layers:
                    quantizer.mode = mode
                error, count, propagated = 0.0, 0, []
                for call, target in zip(calls, targets):
                    env = runner.run(block.nodes, dict(call), linear)
                    squared, numel = _squared_error([env[n] for n in block.outputs], [target[n] for n in block.outputs])
                    error, count = error + float(squared), count + numel
                    propagated.append({node: env[node] for node in next_inputs})
                return error / max(count, 1), propagated

            rtn_error, rtn_next = evaluate("rtn", q_calls)

        train_calls = q_calls if options.inputs == "quantized" else fp_calls
        inputs = _Rows(block.inputs, train_calls, symbol)
        outputs = _Rows(block.outputs, targets, symbol)
        inputs.batch_major = outputs.batch_major = inputs.batch_major and outputs.batch_major
        optimizer = torch.optim.Adam([q.v for q in layers], lr=options.learning_rate)
        warmup = int(options.warmup * options.iterations)
        normaliser = max(rtn_error, 1e-30)
        for quantizer in layers:
            quantizer.mode = "soft"
        first_loss = last_loss = math.nan
        with torch.enable_grad():
            for step in range(options.iterations):
                selection = inputs.select(options.batch_size, generator)
                env, target = inputs.values(selection), outputs.values(selection)
                env = runner.run(block.nodes, env, linear)
                squared, numel = _squared_error([env[n] for n in block.outputs], [target[n] for n in block.outputs])
                loss = squared / numel / normaliser
                if step >= warmup and options.regularization > 0:
                    progress = (step - warmup) / max(options.iterations - warmup, 1)
                    beta = options.beta_end + (options.beta_start - options.beta_end) * (1 - progress)
                    loss = loss + options.regularization * sum(q.regularization(beta) for q in layers) / len(layers)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                last_loss = float(loss.detach())
                first_loss = last_loss if step == 0 else first_loss
            undecided = sum(int(((q.h() > 0.01) & (q.h() < 0.99)).sum()) for q in layers)

        with torch.no_grad():
            learned_error, learned_next = evaluate("hard", q_calls)
            keep = learned_error < rtn_error
            mode = "hard" if keep else "rtn"
            for quantizer in layers:
                quantizer.mode = mode
            q_calls = learned_next if keep else rtn_next
        fp_calls = fp_next
        seconds = time.perf_counter() - block_started
        db = (lambda e: 10 * math.log10(rtn_error / e) if e > 0 else math.inf)
        entry = {"block": block.path, "layers": block.layers, "rtn_mse": rtn_error, "adaround_mse": learned_error,
                 "gain_db": db(learned_error), "kept": "adaround" if keep else "rtn", "seconds": seconds,
                 "first_loss": first_loss, "last_loss": last_loss,
                 "flipped": sum(int((q.codes("hard") != q.rtn_codes).sum()) for q in layers),
                 "undecided": undecided,
                 "weights": sum(q.rtn_codes.numel() for q in layers)}
        summary["blocks"].append(entry)
        for quantizer in layers:
            qweight, scale = quantizer.final()
            plan = quantizer.plan
            if keep:
                plan.weight.set_rounded(qweight, scale, ROUNDING)
                plan.notes.append(f"AdaRound block reconstruction of {block.path}: block output MSE "
                                  f"{rtn_error:.3g} (RTN) -> {learned_error:.3g} ({entry['gain_db']:+.2f} dB), "
                                  f"{options.iterations} iterations, {seconds:.1f} s")
            else:
                plan.weight.set_rounded(qweight, scale, "rtn" + ("+clip" if plan.weight.clip_search else ""))
                plan.notes.append(f"block reconstruction of {block.path} kept round to nearest: learned rounding "
                                  f"gave block output MSE {learned_error:.3g} against {rtn_error:.3g}")
        del targets, inputs, outputs, optimizer

    for name in outside:
        ctx.plan.layers[name].notes.append("not in a repeated block: round to nearest, no reconstruction")
    peak, kind = _peak_memory_mib(device)
    summary.update(seconds=time.perf_counter() - started, peak_memory_mib=peak, peak_memory_kind=kind,
                   calibration_calls=len(samples), outside=outside)
    ctx.plan.summary[SUMMARY] = summary
    note = (f"block reconstruction: {len(blocks)} blocks in {summary['seconds']:.1f} s, peak memory "
            f"{peak:.0f} MiB ({kind})")
    for block in blocks:
        for name in block.layers:
            ctx.plan.layers[name].notes.append(note)
