"""Calibration data from the float model's own sampling trajectories (PTQ4DiT, TQ-DiT).

`calibration_set` runs the model's denoising loop with a diffusers DDPM or DDIM scheduler and
classifier-free guidance, and records the model's inputs (x_t, t, class labels; conditional and
null-class rows together, as the model sees them while sampling) at evenly spaced steps. Each
recorded batch holds one timestep, as the calibration runner keys statistics by timestep.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

if TYPE_CHECKING:  # diffusers is imported on first use: `import dqcompile` stays light
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

# make_inputs(sample, timestep, class_labels) -> keyword inputs of the model's forward.
MakeInputs = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], dict[str, Any]]


@dataclass
class CalibrationSet:
    """Recorded model inputs: `batches[i]` holds the keyword inputs of one model call at `timesteps[i]`.

    Iterating gives the batches (what `dqcompile.quantize(..., calibration=...)` takes).
    samples_per_timestep: images per batch (a guided batch has twice as many rows).
    guidance_scale: the guidance the trajectories were sampled with (None: unguided, no null rows).
    scheduler: the diffusers scheduler class that sampled them.
    labels: the class label of each image (the conditional rows of every batch).
    """

    batches: list[dict[str, Any]]
    timesteps: list[int]
    samples_per_timestep: int
    guidance_scale: float | None
    scheduler: str = ""
    labels: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.batches[index]


def _make_scheduler(scheduler: str | SchedulerMixin) -> SchedulerMixin:
    """A copy of the scheduler given, or for "ddpm" / "ddim" one with diffusers' default schedule
    (1000 steps, linear betas). A model trained on another schedule needs its own scheduler passed."""
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

    from dqcompile.sampling import make_scheduler

    if isinstance(scheduler, SchedulerMixin):
        return type(scheduler).from_config(scheduler.config)
    if scheduler not in ("ddpm", "ddim"):
        raise ValueError(f"scheduler={scheduler!r} is not allowed; allowed values: 'ddpm', 'ddim' or a diffusers scheduler")
    return make_scheduler(scheduler)


def _class_conditional_inputs(model: nn.Module) -> MakeInputs:
    """Keyword inputs for a forward (sample, timestep, class labels, ...): by these names (diffusers
    DiT: hidden_states, timestep, class_labels) or, for a forward of exactly three parameters, by position."""
    names = list(inspect.signature(model.forward).parameters)
    if {"timestep", "class_labels"} <= set(names):
        keys = (names[0], "timestep", "class_labels")
    elif len(names) == 3:
        keys = tuple(names)
    else:
        raise ValueError(
            f"calibration_set cannot tell how to call {type(model).__name__}.forward({', '.join(names)}) with "
            "(sample, timestep, class labels): pass make_inputs=fn(sample, timestep, class_labels) -> keyword "
            "inputs (text-conditioned models such as PixArt and SD3 need their encoder states from it)"
        )
    return lambda sample, timestep, labels: dict(zip(keys, (sample, timestep, labels)))


def _epsilon(output: Any, channels: int) -> torch.Tensor:
    """The noise prediction of a model output (diffusers output, tuple or tensor); a learned-sigma
    output (2C channels) keeps its first C, as diffusers' DiTPipeline does."""
    prediction = output.sample if hasattr(output, "sample") else output[0] if isinstance(output, tuple) else output
    return prediction[:, :channels].float()


def _sample_shape(model: nn.Module, sample_shape: tuple[int, ...] | None) -> tuple[int, ...]:
    if sample_shape is not None:
        return tuple(sample_shape)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "in_channels") and hasattr(config, "sample_size"):
        return (config.in_channels, config.sample_size, config.sample_size)
    raise ValueError(f"calibration_set: {type(model).__name__} has no diffusers config: pass sample_shape=(C, H, W)")


def _recorded_steps(num_timesteps: int, num_inference_steps: int) -> list[int]:
    if not 1 <= num_timesteps <= num_inference_steps:
        raise ValueError(
            f"num_timesteps={num_timesteps} must be between 1 and num_inference_steps={num_inference_steps}"
        )
    return sorted(set(np.linspace(0, num_inference_steps - 1, num_timesteps).round().astype(int).tolist()))


@torch.no_grad()
def calibration_set(
    model: nn.Module,
    *,
    num_timesteps: int = 25,
    samples_per_timestep: int = 32,
    num_inference_steps: int = 250,
    scheduler: Literal["ddpm", "ddim"] | SchedulerMixin = "ddpm",
    guidance_scale: float | None = 1.5,
    num_classes: int | None = None,
    null_class: int | None = None,
    sample_shape: tuple[int, ...] | None = None,
    make_inputs: MakeInputs | None = None,
    seed: int = 0,
    progress: bool = True,
) -> CalibrationSet:
    """Record calibration inputs from the float model's own sampling with classifier-free guidance.

    The model samples `samples_per_timestep` images (class labels 0, 1, ..., num_classes - 1, 0, ...:
    balanced over classes) for `num_inference_steps` steps of `scheduler`, and the inputs of its
    calls at `num_timesteps` evenly spaced steps (the first and the last included) are kept: one
    batch per step, conditional rows then null-class rows when guided.

    Args:
        model: the float model (eval mode is used; the model's mode is restored).
        scheduler: a diffusers DDPM or DDIM scheduler (copied) with the model's own noise schedule, or
            "ddpm" / "ddim" for diffusers' default 1000-step linear-beta schedule. Pass the model's
            scheduler whenever it was trained on another schedule (dqcompile.fmnist.make_scheduler for
            the embedded Fashion-MNIST model).
        guidance_scale: eps = eps_null + w (eps_cond - eps_null); None or <= 1: no guidance, no null rows.
        num_classes: default: the diffusers DiT config's num_embeds_ada_norm.
        null_class: label of the unconditional rows; default num_classes (diffusers DiT's convention).
        sample_shape: (C, H, W) of x_t; default from the diffusers config (in_channels, sample_size).
        make_inputs: fn(sample, timestep, class_labels) -> keyword inputs of model.forward, for
            forwards other than (sample, timestep, class labels); class_labels holds null_class on
            the unconditional rows.
        seed: seeds the initial noise and the DDPM noise.

    Returns:
        a CalibrationSet (iterable of keyword-input dicts, with .timesteps).

    Raises:
        ValueError: for a quantized model (trajectories come from the float model), a forward it
            cannot call without make_inputs, or a missing num_classes / sample_shape.
    """
    from dqcompile.model import QuantizedModel

    if isinstance(model, QuantizedModel):
        raise ValueError("calibration_set records the float model's trajectories: pass the float model, not a QuantizedModel")
    config = getattr(model, "config", None)
    if num_classes is None:
        num_classes = getattr(config, "num_embeds_ada_norm", None) if config is not None else None
        if num_classes is None:
            raise ValueError(f"calibration_set: pass num_classes= for {type(model).__name__}")
    null_class = num_classes if null_class is None else null_class
    make_inputs = make_inputs or _class_conditional_inputs(model)
    shape = _sample_shape(model, sample_shape)
    recorded = _recorded_steps(num_timesteps, num_inference_steps)
    noise_scheduler = _make_scheduler(scheduler)
    noise_scheduler.set_timesteps(num_inference_steps)
    guided = guidance_scale is not None and guidance_scale > 1.0

    parameter = next(model.parameters())
    device, dtype = parameter.device, parameter.dtype
    generator = torch.Generator().manual_seed(seed)
    labels = (torch.arange(samples_per_timestep) % num_classes).to(device)
    row_labels = torch.cat([labels, torch.full_like(labels, null_class)]) if guided else labels
    latents = torch.randn((samples_per_timestep, *shape), generator=generator).to(device)
    latents = latents * noise_scheduler.init_noise_sigma

    batches, timesteps = [], []
    was_training = model.training
    model.eval()
    try:
        steps = noise_scheduler.timesteps[: recorded[-1] + 1]
        for index, t in enumerate(tqdm(steps, desc="calibration trajectories", disable=not progress, leave=False)):
            model_input = noise_scheduler.scale_model_input(latents, t)
            rows = torch.cat([model_input, model_input]) if guided else model_input.clone()
            timestep = torch.full((rows.shape[0],), int(t), device=device, dtype=torch.long)
            inputs = make_inputs(rows.to(dtype), timestep, row_labels)
            if index in recorded:
                batches.append(inputs)
                timesteps.append(int(t))
            eps = _epsilon(model(**inputs), shape[0])
            if guided:
                conditional, unconditional = eps.chunk(2)
                eps = unconditional + guidance_scale * (conditional - unconditional)
            latents = noise_scheduler.step(eps, t, latents, generator=generator).prev_sample
    finally:
        model.train(was_training)
    return CalibrationSet(
        batches=batches,
        timesteps=timesteps,
        samples_per_timestep=samples_per_timestep,
        guidance_scale=guidance_scale if guided else None,
        scheduler=type(noise_scheduler).__name__,
        labels=labels.cpu(),
    )
