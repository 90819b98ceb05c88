"""Per-layer error of a quantized model against its float model: SQNR of each quantized layer's output.

    SQNR = 10 log10( sum ||y_fp||^2 / sum ||y_fp - y_q||^2 )   (dB; sums over every call and input batch)

Two modes:
- isolated (default): every quantized layer sees the float model's inputs. The quantized graph runs with
  each quantized layer's output replaced, after it is measured, by the float output, so the error of a
  layer is its own (its weights and its activation quantizer), not what earlier layers left it.
- accumulated: the quantized graph runs as it is; each layer's output carries the error of every layer
  before it. Where accumulated error grows fast, the layers just before are the ones to look at.

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
from torch import nn
from torch.fx import GraphModule, Interpreter, Node
from tqdm.auto import tqdm

from dqcompile.capture import CallBinding, Captured, capture
from dqcompile.model import QuantizedModel
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
    """

    name: str
    precision: str
    mode: str
    signal: float
    noise: float
    measured: bool = True
    note: str = ""

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


OnOutput = Callable[[str, int, torch.Tensor], torch.Tensor]


class _LayerOutputs(Interpreter):
    """Runs a graph and hands each layer output (name, call index, value) to `on_output`.

    on_output returns the value the rest of the graph sees.
    """

    def __init__(self, gm: GraphModule, layers: Mapping[Node, tuple[str, int]], on_output: OnOutput) -> None:
        super().__init__(gm)
        self.layers = layers
        self.on_output = on_output

    def run_node(self, node: Node) -> Any:
        value = super().run_node(node)
        if node in self.layers:
            name, call = self.layers[node]
            return self.on_output(name, call, value)
        return value


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
    progress: bool = True,
) -> list[LayerError]:
    """SQNR of every quantized layer of `qmodel` against `fp_model` (the model it was quantized from).

    inputs: keyword inputs of the model's forward (a dict) or positional ones (a tuple), or a list of
        them (e.g. calibration samples); every batch needs at least 2 rows (the float model is captured
        with a dynamic batch on the first).
    mode: "isolated" or "accumulated" (see the module docstring).
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

    for sample in tqdm(samples, desc="layer errors", disable=not progress, leave=False):
        reference: dict[tuple[str, int], torch.Tensor] = {}

        def keep_float(name: str, call: int, value: torch.Tensor) -> torch.Tensor:
            reference[name, call] = value
            return value

        def measure(name: str, call: int, value: torch.Tensor) -> torch.Tensor:
            expected = reference.pop((name, call))
            if expected.shape != value.shape:
                raise ValueError(f"layer {name}: output shape {tuple(value.shape)} differs from the float model's {tuple(expected.shape)}")
            expected32 = expected.float()
            signal[name] += float(expected32.square().sum())
            noise[name] += float((expected32 - value.float()).square().sum())
            return expected.to(value.dtype) if mode == "isolated" else value

        _LayerOutputs(fp_gm, _call_index({n: fp_outputs[n] for n in measured}), keep_float).run(
            *_graph_args(fp_gm, captured.binding, sample), enable_io_processing=False
        )
        _LayerOutputs(q_gm, _call_index(measured), measure).run(
            *_graph_args(q_gm, qmodel.binding, sample), enable_io_processing=False
        )
    return [
        LayerError(name, precisions[name].label, mode, signal.get(name, 0.0), noise.get(name, 0.0),
                   measured=name in measured, note=notes.get(name, ""))
        for name in quantized
    ]


def worst_first(errors: Iterable[LayerError]) -> list[LayerError]:
    """Lowest SQNR first, layers not measured last; ties in graph order."""
    return sorted(errors, key=lambda error: (not error.measured, error.sqnr_db if error.measured else 0.0))


CSV_FIELDS = ("rank", "layer", "sqnr_db", "precision", "mode", "note")


def _db(error: LayerError, digits: int) -> str:
    return f"{error.sqnr_db:.{digits}f}" if error.measured else "not measured"


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
            writer.writerow((rank, error.name, _db(error, 3), error.precision, error.mode, error.note))
        return buffer.getvalue()
    if fmt != "text":
        raise ValueError(f"fmt={fmt!r} is not allowed; allowed values: 'text', 'csv'")
    header = ("#", "layer", "SQNR dB", "precision", "note")
    table = [(str(rank), e.name, _db(e, 2), e.precision, e.note) for rank, e in enumerate(rows, 1)]
    widths = [max(len(row[i]) for row in [header, *table]) for i in range(len(header))]
    line = lambda row: "  ".join(cell.rjust(w) if i in (0, 2) else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
    title = "; ".join(f"{mode}: {MODE_MEANING[mode]}" for mode in modes) or "no quantized layer"
    return "\n".join([f"per-layer SQNR, worst first ({title})", line(header), *map(line, table)]) + "\n"
