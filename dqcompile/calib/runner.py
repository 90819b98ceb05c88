"""Run calibration samples through a captured graph, node by node, calling the probes that watch nodes."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch.fx import GraphModule, Interpreter, Node
from torch.fx._pytree import tree_flatten_spec
from torch.utils import _pytree as pytree
from tqdm.auto import tqdm

from dqcompile.calib.probes import CalibrationCall, Probe
from dqcompile.capture import CallBinding

# Names a forward's timestep argument goes by (diffusers: timestep; hand-written DiTs: t).
TIMESTEP_ARGUMENTS = ("timestep", "timesteps", "t")


def timestep_key(sample: Mapping[str, Any]) -> float:
    """The timestep a calibration sample belongs to (its first timestep value; 0 when it has none).

    Calibration sets hold one timestep per sample batch, so the first value names the batch. The
    timestep is the first argument named as in TIMESTEP_ARGUMENTS.
    """
    for name in TIMESTEP_ARGUMENTS:
        if sample.get(name) is not None:
            return float(torch.as_tensor(sample[name]).reshape(-1)[0])
    return 0.0


def check_finite(sample: Mapping[str, Any], index: int) -> None:
    """Refuse a calibration sample with NaN or inf, naming the argument and the sample."""
    for name, value in sample.items():
        for leaf in pytree.tree_leaves(value):
            if isinstance(leaf, torch.Tensor) and leaf.is_floating_point() and not torch.isfinite(leaf).all():
                raise ValueError(f"calibration sample {index}: argument {name!r} holds NaN or inf")


class _ProbedInterpreter(Interpreter):
    def __init__(self, gm: GraphModule, call: CalibrationCall, probes: Mapping[str, Sequence[Probe]]) -> None:
        super().__init__(gm)
        self.call = call
        self.probes = probes

    def run_node(self, node: Node) -> Any:
        result = super().run_node(node)
        watching = self.probes.get(node.name)
        if watching:
            args, _ = self.fetch_args_kwargs_from_env(node)
            for probe in watching:
                probe(self.call, args, result)
        return result


def run_graph(gm: GraphModule, graph_inputs: Mapping[str, Any], probes: Iterable[Probe] = (),
              call: CalibrationCall = CalibrationCall(0, 0.0)) -> Any:
    """The graph's first output for keyword graph inputs (CallBinding.graph_kwargs), running the probes."""
    by_node: dict[str, list[Probe]] = {}
    for probe in probes:
        by_node.setdefault(probe.node_name, []).append(probe)
    flat = tree_flatten_spec(((), dict(graph_inputs)), gm._in_spec)
    output = _ProbedInterpreter(gm, call, by_node).run(*flat, enable_io_processing=False)
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def run_calibration(
    gm: GraphModule,
    binding: CallBinding,
    samples: Sequence[Mapping[str, Any]],
    probes: Sequence[Probe],
    *,
    progress: bool = True,
    desc: str = "calibrate",
) -> None:
    """Feed every sample (keyword inputs of the model's forward) through `gm`, calling `probes`.

    Each call's timestep key (timestep_key) tells the probes which timestep they see. Samples with
    NaN or inf are refused, naming the sample and the argument.
    """
    for index, sample in enumerate(tqdm(samples, desc=desc, disable=not progress, leave=False)):
        check_finite(sample, index)
        inputs, _ = binding.graph_kwargs((), dict(sample), sample_index=index)
        try:
            run_graph(gm, inputs, probes, CalibrationCall(index, timestep_key(sample)))
        except (RuntimeError, AssertionError, IndexError) as error:
            # The captured graph's own checks (shapes fixed at capture, dtypes) fail deep inside torch.
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ValueError(f"calibration sample {index} does not fit the model as it was captured "
                             f"(from the first sample or example_inputs): {first_line}") from error
