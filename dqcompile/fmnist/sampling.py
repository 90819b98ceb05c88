"""Sampling the embedded Fashion-MNIST DiT: the core sampler (dqcompile.sampling) with this model's
defaults, namely its noise schedule, its null class (label 10) and its sample shape (1 x 32 x 32).

The sampler settings are arguments: ``scheduler`` ("ddim" or "ddpm", or any diffusers scheduler),
``clip_sample`` and ``timestep_spacing`` (None: the value in the checkpoint's scheduler config).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from dqcompile.fmnist.data import MODEL_IMAGE_SIZE
from dqcompile.fmnist.dit import NULL_CLASS_ID, make_scheduler
from dqcompile.sampling import SCHEDULER_KINDS, StepCallback, image_noise_generators
from dqcompile.sampling import sample as sample_with_scheduler

if TYPE_CHECKING:
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

__all__ = ["sample", "StepCallback", "image_noise_generators"]


def sample(
    model: nn.Module,
    class_labels: torch.Tensor,
    *,
    steps: int = 50,
    scheduler: Literal["ddim", "ddpm"] | SchedulerMixin = "ddim",
    guidance_scale: float | None = 1.5,
    seed: int = 0,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    progress: bool = True,
    callback: StepCallback | None = None,
    scheduler_config: dict[str, Any] | None = None,
    null_class_id: int = NULL_CLASS_ID,
    clip_sample: bool | None = None,
    timestep_spacing: str | None = None,
) -> torch.Tensor:
    """Sample one image per class label with the embedded model's defaults (dqcompile.sampling.sample
    documents the arguments it shares).

    scheduler: "ddim" or "ddpm" with the noise schedule of ``scheduler_config`` (default: the embedded
        model's) and the sampler settings ``clip_sample`` / ``timestep_spacing`` laid over it, or a
        diffusers scheduler used as it is (the three schedule arguments must then be left out).
    Returns float32 model-space images [N, C, H, W] (nominally in [-1, 1]), on the sampling device.
    """
    if isinstance(scheduler, str):
        if scheduler not in SCHEDULER_KINDS:
            raise ValueError(f"scheduler must be 'ddim' or 'ddpm' or a diffusers scheduler, got {scheduler!r}")
        scheduler = make_scheduler(scheduler, scheduler_config, clip_sample=clip_sample,
                                   timestep_spacing=timestep_spacing)
    elif scheduler_config is not None or clip_sample is not None or timestep_spacing is not None:
        raise ValueError("scheduler_config, clip_sample and timestep_spacing go with scheduler='ddim' or 'ddpm', "
                         "not with a scheduler instance")
    config = getattr(model, "config", None)
    shape = (getattr(config, "in_channels", 1), *(2 * (getattr(config, "sample_size", MODEL_IMAGE_SIZE),)))
    return sample_with_scheduler(
        model, class_labels, scheduler=scheduler, null_class_id=null_class_id, steps=steps,
        guidance_scale=guidance_scale, sample_shape=shape, seed=seed, batch_size=batch_size, device=device,
        progress=progress, callback=callback,
    )
