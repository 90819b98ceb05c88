"""Run calibration samples through a graph whose observers record statistics."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch.fx import GraphModule
from torch.utils import _pytree as pytree
from tqdm.auto import tqdm

from dqcompile.capture import CallBinding
from dqcompile.passes.observers import observers


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


@torch.no_grad()
def run_calibration(
    gm: GraphModule, binding: CallBinding, samples: Iterable[Mapping[str, Any]], *, progress: bool = True
) -> int:
    """Feed every sample (keyword inputs of the model's forward) through `gm`; returns the count."""
    graph_observers = observers(gm)
    count = 0
    samples = list(samples)
    for index, sample in enumerate(tqdm(samples, desc="calibrate", disable=not progress, leave=False)):
        check_finite(sample, index)
        key = timestep_key(sample)
        for observer in graph_observers:
            observer.timestep = key
        inputs, _ = binding.graph_kwargs((), dict(sample))
        gm(**inputs)
        count += 1
    return count
