"""Example inputs for the model families dqcompile knows, built from their configs."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

EXAMPLE_BATCH = 2


def _param(model: nn.Module) -> torch.Tensor:
    return next(model.parameters())


def default_example_inputs(model: nn.Module, batch: int = EXAMPLE_BATCH) -> dict[str, Any]:
    """Keyword inputs for one forward of a diffusers DiT, PixArt or SD3 transformer.

    Other models need explicit `example_inputs` (their forward's arguments for a batch of 2);
    the error says so.
    """
    kind = type(model).__name__
    config = getattr(model, "config", None)
    param = _param(model)
    device, dtype = param.device, param.dtype
    generator = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    timestep = torch.tensor([999, 1], device=device).repeat(batch)[:batch]  # alternating ends of the schedule
    if config is not None and kind == "DiTTransformer2DModel":
        return {
            "hidden_states": randn(batch, config.in_channels, config.sample_size, config.sample_size),
            "timestep": timestep,
            "class_labels": torch.arange(batch, device=device) % config.num_embeds_ada_norm,
        }
    if config is not None and kind == "PixArtTransformer2DModel":
        return {
            "hidden_states": randn(batch, config.in_channels, config.sample_size, config.sample_size),
            "encoder_hidden_states": randn(batch, 8, config.caption_channels),
            "timestep": timestep,
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
        }
    if config is not None and kind == "SD3Transformer2DModel":
        return {
            "hidden_states": randn(batch, config.in_channels, config.sample_size, config.sample_size),
            "encoder_hidden_states": randn(batch, 8, config.joint_attention_dim),
            "pooled_projections": randn(batch, config.pooled_projection_dim),
            "timestep": timestep,
        }
    raise ValueError(
        f"dqcompile has no default example inputs for {kind}: pass example_inputs=... (the keyword "
        "arguments of its forward for a batch of 2) or calibration=..."
    )
