"""Class-conditional sampling with classifier-free guidance, for any model called as
``model(x, timestep=t, class_labels=y)`` (the diffusers DiT signature) and any diffusers DDIM or DDPM
scheduler: a quantized drop-in replacement samples through the same code as the float model.

Nothing here knows a particular model: the noise schedule (a diffusers scheduler, or a schedule config
and a kind), the null class id of classifier-free guidance and the sample shape are arguments. The
sampler settings that change results (scheduler kind, ``clip_sample``, ``timestep_spacing``, step count)
are therefore the caller's explicit protocol choice; ``make_scheduler`` builds a scheduler from a
model's training schedule with those settings laid over it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Callable, Literal

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

if TYPE_CHECKING:  # diffusers is imported on first use: `import dqcompile` stays light
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

__all__ = ["SCHEDULER_KINDS", "StepCallback", "image_noise_generators", "make_scheduler", "sample"]

SCHEDULER_KINDS = ("ddim", "ddpm")

# callback(step_index, t, model_output): model_output is the (guided) epsilon of all N images at step
# step_index, float32 [N, C, H, W], on the sampling device.
StepCallback = Callable[[int, int, torch.Tensor], None]


def make_scheduler(
    kind: Literal["ddim", "ddpm"], config: Mapping[str, Any] | None = None, **settings: Any
) -> SchedulerMixin:
    """A fresh diffusers scheduler of ``kind`` for the training schedule ``config`` (betas, number of
    training steps, prediction type; default: diffusers' default DDPM schedule, 1000 steps, linear
    betas), with the sampler ``settings`` (e.g. ``clip_sample=False``, ``timestep_spacing="trailing"``)
    laid over it. A setting whose value is None keeps the config's."""
    from diffusers import DDIMScheduler, DDPMScheduler

    if kind not in SCHEDULER_KINDS:
        raise ValueError(f"scheduler kind must be 'ddim' or 'ddpm', got {kind!r}")
    merged = dict(DDPMScheduler().config if config is None else config)
    merged.update({key: value for key, value in settings.items() if value is not None})
    merged.pop("_class_name", None)
    return (DDIMScheduler if kind == "ddim" else DDPMScheduler).from_config(merged)


def _fresh_scheduler(scheduler: SchedulerMixin | Mapping[str, Any]) -> SchedulerMixin:
    """A copy of a scheduler instance (sampling sets its timesteps; the caller's stays as it was), or a
    DDIM scheduler (the config's ``_class_name`` when it names DDPM) from a config mapping."""
    if isinstance(scheduler, Mapping):
        kind = "ddpm" if scheduler.get("_class_name") == "DDPMScheduler" else "ddim"
        return make_scheduler(kind, scheduler)
    if not hasattr(scheduler, "set_timesteps") or not hasattr(scheduler, "step"):
        raise ValueError(f"scheduler must be a diffusers scheduler or a config mapping, got {type(scheduler).__name__}")
    return type(scheduler).from_config(scheduler.config)


def image_noise_generators(seed: int, num_images: int) -> list[torch.Generator]:
    """One CPU generator per image: image i's noise depends only on (seed, i), not on batching.

    CPU generators use only the low 32 bits of their seed, so image i gets seed (base + i) mod 2^32 with
    a 32-bit base hashed from ``seed``: distinct generators within one call, and unrelated bases for
    different seeds (so seed 1's images are not seed 0's shifted by one).
    """
    base = int(np.random.SeedSequence(seed).generate_state(1, dtype=np.uint32)[0])
    return [torch.Generator(device="cpu").manual_seed((base + i) % 2**32) for i in range(num_images)]


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """The device and float dtype of a diffusers model or a drop-in replacement with .device/.dtype."""
    device, dtype = getattr(model, "device", None), getattr(model, "dtype", None)
    if device is None or dtype is None:
        first = next(model.parameters())
        device, dtype = device or first.device, dtype or first.dtype
    return torch.device(device), dtype


def _sample_shape(model: nn.Module, sample_shape: tuple[int, ...] | None) -> tuple[int, ...]:
    if sample_shape is not None:
        return tuple(sample_shape)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "in_channels") and hasattr(config, "sample_size"):
        return (config.in_channels, config.sample_size, config.sample_size)
    raise ValueError(f"sample: {type(model).__name__} has no diffusers config: pass sample_shape=(C, H, W)")


@torch.no_grad()
def sample(
    model: nn.Module,
    class_labels: torch.Tensor,
    *,
    scheduler: SchedulerMixin | Mapping[str, Any],
    null_class_id: int,
    steps: int = 50,
    guidance_scale: float | None = 1.5,
    sample_shape: tuple[int, ...] | None = None,
    seed: int = 0,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    progress: bool = True,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Sample one image per class label.

    Args:
        model: the model (or a drop-in replacement), called as ``model(x, timestep=t, class_labels=y)``
            and returning ``.sample``; eval mode is used while sampling (diffusers' DiT drops labels at
            random in train mode) and the model's mode is restored afterwards. A learned-variance output
            (2C channels for C) keeps its first C, as diffusers' DiTPipeline does.
        class_labels: int labels [N].
        scheduler: a diffusers DDIM or DDPM scheduler (copied: the caller's is not changed), or a
            scheduler config mapping (DDIM unless its ``_class_name`` is DDPMScheduler). See
            ``make_scheduler``.
        null_class_id: the label of the unconditional rows of classifier-free guidance.
        steps: denoising steps.
        guidance_scale: classifier-free guidance w: eps = eps_u + w (eps_c - eps_u), with the conditional
            and the null-class rows of an image in one model call. None or <= 1: no guidance, and no
            null-class rows are run (w = 1 would only reproduce eps_c at twice the cost).
        sample_shape: (C, H, W) of one sample; default from the diffusers config (in_channels, sample_size).
        seed: image i's initial noise (and DDPM's per-step noise) comes from its own generator seeded by
            (seed, i), so the same seed gives the same images whatever the batch size.
        batch_size: images per model call (a guided call runs 2 x batch_size rows).
        device: where to sample; default: the model's device.
        progress: show a tqdm bar over the steps.
        callback: called once per step with (step_index, t, guided epsilon of all N images).

    Returns:
        float32 samples [N, C, H, W], on the sampling device.
    """
    labels = class_labels.reshape(-1).to(torch.long)
    num_images = labels.numel()
    if num_images == 0:
        raise ValueError("class_labels is empty")
    model_device, model_dtype = _model_device_dtype(model)
    device = torch.device(device) if device is not None else model_device
    guided = guidance_scale is not None and guidance_scale > 1.0
    channels, *spatial = _sample_shape(model, sample_shape)

    noise_scheduler = _fresh_scheduler(scheduler)
    noise_scheduler.set_timesteps(steps)
    generators = image_noise_generators(seed, num_images)
    latents = torch.cat([torch.randn((1, channels, *spatial), generator=g) for g in generators])
    latents = (latents * noise_scheduler.init_noise_sigma).to(device)
    labels = labels.to(device)

    # Switch only a model in train mode: a drop-in replacement may not support switching at all.
    was_training = model.training
    if was_training:
        model.eval()
    try:
        kind = type(noise_scheduler).__name__.removesuffix("Scheduler").lower()
        for step_index, t in enumerate(
            tqdm(noise_scheduler.timesteps, desc=f"sampling {num_images} ({kind})", disable=not progress)
        ):
            step_outputs = []
            for start in range(0, num_images, batch_size):
                stop = min(start + batch_size, num_images)
                x, y = noise_scheduler.scale_model_input(latents[start:stop], t), labels[start:stop]
                if guided:
                    x, y = torch.cat([x, x]), torch.cat([y, torch.full_like(y, null_class_id)])
                t_batch = torch.full((x.shape[0],), int(t), device=device, dtype=torch.long)
                eps = model(x.to(model_dtype), timestep=t_batch, class_labels=y).sample[:, :channels].float()
                if guided:
                    eps_conditional, eps_unconditional = eps.chunk(2)
                    eps = eps_unconditional + guidance_scale * (eps_conditional - eps_unconditional)
                latents[start:stop] = noise_scheduler.step(
                    eps, t, latents[start:stop], generator=generators[start:stop]
                ).prev_sample
                step_outputs.append(eps)
            if callback is not None:
                callback(step_index, int(t), torch.cat(step_outputs))
    finally:
        if was_training:
            model.train()
    return latents
