"""Class-conditional sampling with classifier-free guidance for the embedded Fashion-MNIST DiT.

Works with any model called as ``model(x, timestep=t, class_labels=y).sample`` (the diffusers DiT
signature), so a quantized drop-in replacement samples through the same code as the float model.
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from dqcompile.models.fmnist import NULL_CLASS_ID, make_scheduler

__all__ = ["sample", "StepCallback", "image_noise_generators"]

# callback(step_index, t, model_output): model_output is the (guided) epsilon of all N images at step
# step_index, float32 [N, C, H, W], on the sampling device.
StepCallback = Callable[[int, int, torch.Tensor], None]


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


@torch.no_grad()
def sample(
    model: nn.Module,
    class_labels: torch.Tensor,
    *,
    steps: int = 50,
    scheduler: Literal["ddim", "ddpm"] = "ddim",
    guidance_scale: float | None = 1.5,
    seed: int = 0,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    progress: bool = True,
    callback: StepCallback | None = None,
    scheduler_config: dict[str, Any] | None = None,
    null_class_id: int = NULL_CLASS_ID,
) -> torch.Tensor:
    """Sample one image per class label.

    Args:
        model: the DiT (or a drop-in replacement); eval mode is used while sampling (diffusers' DiT drops
            labels at random in train mode) and the model's mode is restored afterwards.
        class_labels: int labels [N] in [0, 9].
        steps: denoising steps.
        scheduler: "ddim" (eta 0, deterministic given the initial noise) or "ddpm" (ancestral).
        guidance_scale: classifier-free guidance w: eps = eps_u + w (eps_c - eps_u), with the conditional
            and the null-class rows of an image in one model call. None or <= 1: no guidance, and no
            null-class rows are run (w = 1 would only reproduce eps_c at twice the cost).
        seed: image i's initial noise (and DDPM's per-step noise) comes from its own generator seeded by
            (seed, i), so the same seed gives the same images whatever the batch size.
        batch_size: images per model call (a guided call runs 2 x batch_size rows).
        device: where to sample; default: the model's device.
        progress: show a tqdm bar over the steps.
        callback: called once per step with (step_index, t, guided epsilon of all N images).
        scheduler_config: the noise schedule; default: the embedded model's.
        null_class_id: the label of the unconditional row.

    Returns:
        float32 model-space images [N, C, H, W] (nominally in [-1, 1]), on the sampling device.
    """
    labels = class_labels.reshape(-1).to(torch.long)
    num_images = labels.numel()
    if num_images == 0:
        raise ValueError("class_labels is empty")
    model_device, model_dtype = _model_device_dtype(model)
    device = torch.device(device) if device is not None else model_device
    guided = guidance_scale is not None and guidance_scale > 1.0
    config = getattr(model, "config", None)
    channels = getattr(config, "in_channels", 1)
    size = getattr(config, "sample_size", 32)

    noise_scheduler = make_scheduler(scheduler, scheduler_config)
    noise_scheduler.set_timesteps(steps)
    generators = image_noise_generators(seed, num_images)
    latents = torch.cat([torch.randn((1, channels, size, size), generator=g) for g in generators])
    latents = (latents * noise_scheduler.init_noise_sigma).to(device)
    labels = labels.to(device)

    # Switch only a model in train mode: a drop-in replacement may not support switching at all.
    was_training = model.training
    if was_training:
        model.eval()
    try:
        for step_index, t in enumerate(
            tqdm(noise_scheduler.timesteps, desc=f"sampling {num_images} ({scheduler})", disable=not progress)
        ):
            step_outputs = []
            for start in range(0, num_images, batch_size):
                stop = min(start + batch_size, num_images)
                x, y = latents[start:stop], labels[start:stop]
                if guided:
                    x, y = torch.cat([x, x]), torch.cat([y, torch.full_like(y, null_class_id)])
                t_batch = torch.full((x.shape[0],), int(t), device=device, dtype=torch.long)
                eps = model(x.to(model_dtype), timestep=t_batch, class_labels=y).sample.float()
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
