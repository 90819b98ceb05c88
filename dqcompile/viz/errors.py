"""Per-layer error of a quantized model against its float model: SQNR of each quantized layer's output.

    SQNR = 10 log10( sum ||y_fp||^2 / sum ||y_fp - y_q||^2 )   (dB; sums over every call and input batch)

Two modes:
- isolated (default): every quantized layer sees the float model's inputs. The quantized graph runs with
  each quantized layer's output replaced, after it is measured, by the float output, so the error of a
  layer is its own (its weights and its activation quantizer), not what earlier layers left it.
- accumulated: the quantized graph runs as it is; each layer's output carries the error of every layer
  before it. Where accumulated error grows fast, the layers just before are the ones to look at.

Attribution (split=True, the default): each layer's error is also split into the part its weights make
and the part its activation quantizer makes. With x the input the quantized layer receives, W^ its
quantized (dequantized) weight, Q its activation quantizer and y_fp the float model's output,

    weight error      e_w = x W^T + b - y_fp           (the layer with float activations)
    activation error  e_a = Q(x) W^T + b - (x W^T + b)  (what quantizing the input adds)

so e_w + e_a is the layer's whole error, exactly; the weight part is computed from the plan's codes
and scales (weight-only linear on the same input), the activation part is the rest. Their noise powers
add up to the layer's noise up to the cross term 2 <e_w, e_a> (`LayerError.cross`), which is small
where the two errors are unrelated. In accumulated mode x carries the earlier layers' error, which
lands in the weight part (its note says so in the tables: "weight + upstream").

The float outputs come from the float model captured on the same inputs (one export), matched to the
quantized graph's layers by name and call order (a layer called twice, like a shared embedder, is
measured on both calls).

Folds. A method that folds a balancing vector b into the weights leaves what the model computes
unchanged, but not always what each layer outputs. PTQ4DiT's adaLN folds keep every quantized layer's
output (the adaLN linear, float, takes the 1/b; the consumers' columns take b). Its V -> output
projection fold (options.balance_out_proj) divides the V layer's output channels by b (the plan's
rescaled_for says so): that layer is
not compared with the float model (its LayerError is marked not measured, with the reason), and in
isolated mode its own output flows on, so the output projection sees balanced inputs, and its error
includes the V layer's (its note says so).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.fx._pytree as fx_pytree
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Interpreter, Node
from tqdm.auto import tqdm

from dqcompile.capture import CallBinding, Captured, capture
from dqcompile.model import QuantizedModel
from dqcompile.passes.context import META_KEY
from dqcompile.plan import LayerPlan
from dqcompile.quant import QuantizedWeight
from dqcompile.viz.graph import FLOAT, layer_output_nodes, layer_precision

ErrorMode = Literal["isolated", "accumulated"]
MODES: tuple[str, ...] = ("isolated", "accumulated")
MODE_MEANING = {
    "isolated": "each quantized layer sees the float model's inputs: the layer's own error",
    "accumulated": "each quantized layer sees the quantized model's own inputs: error of all layers up to it",
}

Sample = Mapping[str, Any] | tuple


@dataclass(frozen=True)
class LayerError:
    """One quantized layer's output error. signal and noise are the summed squares of y_fp and y_fp - y_q.

    measured: False for a layer whose output a fold rescaled (note says why); its sqnr_db is NaN.
    weight_noise, activation_noise: summed squares of the weight and activation errors (see the module
        docstring; None when not split). noise = weight_noise + activation_noise + cross.
    """

    name: str
    precision: str
    mode: str
    signal: float
    noise: float
    measured: bool = True
    note: str = ""
    weight_noise: float | None = None
    activation_noise: float | None = None

    def _db(self, noise: float | None) -> float:
        if not self.measured or noise is None:
            return math.nan
        if noise == 0.0:
            return math.inf
        if self.signal == 0.0:
            return -math.inf
        return 10.0 * math.log10(self.signal / noise)

    @property
    def weight_sqnr_db(self) -> float:
        """SQNR of the weight error alone (the layer with float activations); NaN when not split."""
        return self._db(self.weight_noise)

    @property
    def activation_sqnr_db(self) -> float:
        """SQNR of the activation error alone (inf for a weight-only layer); NaN when not split."""
        return self._db(self.activation_noise)

    @property
    def cross(self) -> float:
        """noise - weight_noise - activation_noise = 2 <e_w, e_a> (NaN when not split)."""
        if self.weight_noise is None or self.activation_noise is None:
            return math.nan
        return self.noise - self.weight_noise - self.activation_noise

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (SQNRs as numbers, or the strings "inf" / "nan")."""
        value = lambda db: db if math.isfinite(db) else str(db)
        return {"layer": self.name, "precision": self.precision, "mode": self.mode, "measured": self.measured,
                "sqnr_db": value(self.sqnr_db), "weight_sqnr_db": value(self.weight_sqnr_db),
                "activation_sqnr_db": value(self.activation_sqnr_db), "signal": self.signal, "noise": self.noise,
                "weight_noise": self.weight_noise, "activation_noise": self.activation_noise, "note": self.note}

    @property
    def sqnr_db(self) -> float:
        """10 log10(signal / noise); inf when the outputs are equal, NaN when not measured."""
        if not self.measured:
            return math.nan
        if self.noise == 0.0:
            return math.inf
        if self.signal == 0.0:
            return -math.inf
        return 10.0 * math.log10(self.signal / self.noise)


def _samples(inputs: Sample | Sequence[Sample]) -> list[Sample]:
    """A dict or a tuple is one batch of inputs; a list holds several."""
    if isinstance(inputs, (Mapping, tuple)):
        return [inputs]
    samples = list(inputs)
    if not samples:
        raise ValueError("layer_errors needs at least one input batch")
    return samples


def _graph_args(gm: GraphModule, binding: CallBinding, sample: Sample) -> list[Any]:
    """The flat placeholder values of one call, as the graph module's own forward flattens them.

    An exported graph module's forward flattens its keyword inputs with its `_in_spec`; the
    Interpreter takes the flat values, so they are flattened the same way here.
    """
    args, kwargs = (sample, {}) if isinstance(sample, tuple) else ((), dict(sample))
    graph_kwargs, _ = binding.graph_kwargs(args, kwargs)
    return fx_pytree.tree_flatten_spec(([], graph_kwargs), gm._in_spec)


OnOutput = Callable[[str, int, torch.Tensor, Mapping[Node, Any]], torch.Tensor]


class _LayerOutputs(Interpreter):
    """Runs a graph and hands each layer output (name, call index, value, kept values) to `on_output`.

    on_output returns the value the rest of the graph sees. keep: nodes whose values on_output reads
    (the Interpreter frees a value after its last use), with how many layer outputs read each.
    """

    def __init__(self, gm: GraphModule, layers: Mapping[Node, tuple[str, int]], on_output: OnOutput,
                 keep: Mapping[Node, int] | None = None) -> None:
        super().__init__(gm)
        self.layers = layers
        self.on_output = on_output
        self.keep = dict(keep or {})
        self.kept: dict[Node, Any] = {}

    def run_node(self, node: Node) -> Any:
        value = super().run_node(node)
        if node in self.keep:
            self.kept[node] = value
        if node in self.layers:
            name, call = self.layers[node]
            return self.on_output(name, call, value, self.kept)
        return value

    def release(self, node: Node) -> None:
        """One reader of a kept value is done with it."""
        self.keep[node] -= 1
        if not self.keep[node]:
            self.kept.pop(node, None)


def layer_operands(output: Node) -> tuple[Node, Node | None]:
    """(input, bias) of the lowered layer whose output node is `output`: the one tensor its ops read from
    outside the layer (not a parameter, not the time-group index), and the bias parameter it adds."""
    name = output.meta.get(META_KEY, {}).get("layer")
    inside, stack, outside = set(), [output], []
    while stack:
        node = stack.pop()
        if node in inside:
            continue
        inside.add(node)
        for source in node.all_input_nodes:
            meta = source.meta.get(META_KEY, {})
            if meta.get("layer") == name and source.op != "placeholder":
                stack.append(source)
            elif source not in outside and not meta.get("time_groups"):
                outside.append(source)
    inputs = [node for node in outside if node.op != "get_attr"]
    biases = [node for node in outside if node.op == "get_attr"]
    if len(inputs) != 1 or len(biases) > 1:
        raise ValueError(f"layer {name}: cannot tell its input among {[n.name for n in inputs]} (attribution)")
    return inputs[0], (biases[0] if biases else None)


def _dequantized_weight(plan: LayerPlan) -> torch.Tensor:
    weight = plan.weight
    return QuantizedWeight(weight.qweight, weight.scale, weight.bits, weight.group_size).dequantize()


def _call_index(outputs: Mapping[str, list[Node]]) -> dict[Node, tuple[str, int]]:
    return {node: (name, call) for name, nodes in outputs.items() for call, node in enumerate(nodes)}


def _rescaled_values(qmodel: QuantizedModel, quantized: set[str]) -> dict[str, tuple[str, ...]]:
    """V layer -> output projections, for the layers whose output channels a fold divided (the plan's
    rescaled_for, set by PTQ4DiT's V -> output projection fold) where an output projection is quantized."""
    return {
        name: layer.rescaled_for
        for name, layer in qmodel.plan.layers.items()
        if layer.rescaled_for and any(output in quantized for output in layer.rescaled_for)
    }


@torch.no_grad()
def layer_errors(
    fp_model: nn.Module | Captured,
    qmodel: QuantizedModel,
    inputs: Sample | Sequence[Sample],
    *,
    mode: ErrorMode = "isolated",
    split: bool = True,
    progress: bool = True,
) -> list[LayerError]:
    """SQNR of every quantized layer of `qmodel` against `fp_model` (the model it was quantized from).

    inputs: keyword inputs of the model's forward (a dict) or positional ones (a tuple), or a list of
        them (e.g. calibration samples); every batch needs at least 2 rows (the float model is captured
        with a dynamic batch on the first).
    mode: "isolated" or "accumulated" (see the module docstring).
    split: also split each layer's error into its weight and activation parts (module docstring).
    Returns the errors in graph order (format_layer_errors sorts them). Raises ValueError naming the
    layer when the two models' layers do not match.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not allowed; allowed values: {', '.join(map(repr, MODES))}")
    samples = _samples(inputs)
    captured = fp_model if isinstance(fp_model, Captured) else capture(fp_model, samples[0])
    fp_gm, q_gm = captured.graph_module, qmodel.graph_module
    fp_outputs, q_outputs = layer_output_nodes(fp_gm), layer_output_nodes(q_gm)
    precisions = {name: layer_precision(q_gm, nodes[0]) for name, nodes in q_outputs.items()}
    quantized = {name: nodes for name, nodes in q_outputs.items() if precisions[name].label != FLOAT}
    for name, nodes in quantized.items():
        fp_calls = len(fp_outputs.get(name, ()))
        if fp_calls != len(nodes):
            raise ValueError(
                f"layer {name}: the quantized graph calls it {len(nodes)} time(s), the float model {fp_calls}; "
                "pass the float model the quantized model was made from"
            )
    rescaled = _rescaled_values(qmodel, set(quantized))
    notes = {name: "output channels divided by the V -> output projection balancing: not comparable with the float model"
             for name in rescaled}
    if mode == "isolated":
        for value, outputs in rescaled.items():
            for name in outputs:
                notes[name] = f"input from the quantized, balanced {value}: includes its error"
    measured = {name: nodes for name, nodes in quantized.items() if name not in rescaled}
    signal = dict.fromkeys(measured, 0.0)
    noise = dict.fromkeys(measured, 0.0)
    weight_noise = dict.fromkeys(measured, 0.0) if split else {}
    activation_noise = dict.fromkeys(measured, 0.0) if split else {}
    operands = {(name, call): layer_operands(node) for name, nodes in measured.items()
                for call, node in enumerate(nodes)} if split else {}
    readers: dict[Node, int] = {}
    for pair in operands.values():
        for node in pair:
            if node is not None:
                readers[node] = readers.get(node, 0) + 1
    weights: dict[str, torch.Tensor] = {}

    for sample in tqdm(samples, desc="layer errors", disable=not progress, leave=False):
        reference: dict[tuple[str, int], torch.Tensor] = {}

        def keep_float(name: str, call: int, value: torch.Tensor, env: Mapping[Node, Any]) -> torch.Tensor:
            reference[name, call] = value
            return value

        def measure(name: str, call: int, value: torch.Tensor, env: Mapping[Node, Any]) -> torch.Tensor:
            expected = reference.pop((name, call))
            if expected.shape != value.shape:
                raise ValueError(f"layer {name}: output shape {tuple(value.shape)} differs from the float model's {tuple(expected.shape)}")
            expected32 = expected.float()
            signal[name] += float(expected32.square().sum())
            noise[name] += float((expected32 - value.float()).square().sum())
            if split:
                x_node, bias_node = operands[name, call]
                x = env[x_node]
                if name not in weights:
                    weights[name] = _dequantized_weight(qmodel.plan.layers[name]).to(x.device)
                bias = env[bias_node].float() if bias_node is not None else None
                weight_only = F.linear(x.float(), weights[name], bias)
                weight_noise[name] += float((weight_only - expected32).square().sum())
                activation_noise[name] += float((value.float() - weight_only).square().sum())
                for node in (x_node, bias_node):
                    if node is not None:
                        quantized_run.release(node)
            return expected.to(value.dtype) if mode == "isolated" else value

        _LayerOutputs(fp_gm, _call_index({n: fp_outputs[n] for n in measured}), keep_float).run(
            *_graph_args(fp_gm, captured.binding, sample), enable_io_processing=False
        )
        quantized_run = _LayerOutputs(q_gm, _call_index(measured), measure, readers)
        quantized_run.run(*_graph_args(q_gm, qmodel.binding, sample), enable_io_processing=False)
    return [
        LayerError(name, precisions[name].label, mode, signal.get(name, 0.0), noise.get(name, 0.0),
                   measured=name in measured, note=notes.get(name, ""), weight_noise=weight_noise.get(name),
                   activation_noise=activation_noise.get(name))
        for name in quantized
    ]


def worst_first(errors: Iterable[LayerError]) -> list[LayerError]:
    """Lowest SQNR first, layers not measured last; ties in graph order."""
    return sorted(errors, key=lambda error: (not error.measured, error.sqnr_db if error.measured else 0.0))


CSV_FIELDS = ("rank", "layer", "sqnr_db", "precision", "mode", "note", "weight_sqnr_db", "activation_sqnr_db")


def _db(error: LayerError, digits: int) -> str:
    return f"{error.sqnr_db:.{digits}f}" if error.measured else "not measured"


def _split_db(error: LayerError, digits: int) -> tuple[str, str]:
    """The weight and activation SQNRs as text ("" when the error was not split or not measured)."""
    if not error.measured or error.weight_noise is None:
        return "", ""
    return f"{error.weight_sqnr_db:.{digits}f}", f"{error.activation_sqnr_db:.{digits}f}"


def format_layer_errors(errors: Iterable[LayerError], fmt: Literal["text", "csv"] = "text") -> str:
    """The errors as a table sorted worst first: aligned text for logs, or CSV with a header row.

    Both name the mode (isolated or accumulated); the text table also says what it means.
    """
    rows = worst_first(errors)
    modes = sorted({error.mode for error in rows})
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(CSV_FIELDS)
        for rank, error in enumerate(rows, 1):
            writer.writerow((rank, error.name, _db(error, 3), error.precision, error.mode, error.note,
                             *_split_db(error, 3)))
        return buffer.getvalue()
    if fmt != "text":
        raise ValueError(f"fmt={fmt!r} is not allowed; allowed values: 'text', 'csv'")
    upstream = " (+ upstream)" if "accumulated" in modes else ""
    header = ("#", "layer", "SQNR dB", f"weights dB{upstream}", "activations dB", "precision", "note")
    table = [(str(rank), e.name, _db(e, 2), *_split_db(e, 2), e.precision, e.note) for rank, e in enumerate(rows, 1)]
    widths = [max(len(row[i]) for row in [header, *table]) for i in range(len(header))]
    line = lambda row: "  ".join(cell.rjust(w) if i in (0, 2, 3, 4) else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
    title = "; ".join(f"{mode}: {MODE_MEANING[mode]}" for mode in modes) or "no quantized layer"
    return "\n".join([f"per-layer SQNR, worst first ({title})", line(header), *map(line, table)]) + "\n"
