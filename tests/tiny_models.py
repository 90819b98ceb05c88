"""Tiny models for the tests: diffusers DiT, PixArt and SD3 transformers, and a DiT written by hand.

The hand-written DiT is not diffusers: one fused qkv linear, its own `modulate`, the adaLN chunk
order of the original DiT (shift, scale, gate for attention, then for the MLP), and a forward that
takes (x, t, y) positionally and returns a plain tensor.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def tiny_dit(seed: int = 0, **overrides):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    config = dict(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
        sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_type="ada_norm_zero",
    )
    config.update(overrides)
    return DiTTransformer2DModel(**config).eval()


def tiny_pixart(seed: int = 0):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    return PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
        sample_size=8, patch_size=2, cross_attention_dim=32, caption_channels=24,
        norm_type="ada_norm_single", num_embeds_ada_norm=1000,
    ).eval()


def tiny_sd3(seed: int = 0):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=24, caption_projection_dim=32, pooled_projection_dim=16,
        pos_embed_max_size=16,
    ).eval()


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class HandBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        h = modulate(self.norm1(x), shift_msa, scale_msa)
        batch, tokens, dim = h.shape
        qkv = self.qkv(h).reshape(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        x = x + gate_msa.unsqueeze(1) * self.proj(attended.transpose(1, 2).reshape(batch, tokens, dim))
        h = modulate(self.norm2(x), shift_mlp, scale_mlp)
        return x + gate_mlp.unsqueeze(1) * self.fc2(F.gelu(self.fc1(h), approximate="tanh"))


class HandDiT(nn.Module):
    """A class-conditional DiT on [B, C, S, S] images with patch size 2."""

    def __init__(self, channels: int = 4, size: int = 8, dim: int = 32, heads: int = 2, depth: int = 2,
                 num_classes: int = 10) -> None:
        super().__init__()
        self.channels, self.size, self.dim = channels, size, dim
        self.x_embedder = nn.Linear(channels * 4, dim)
        self.pos = nn.Parameter(torch.randn(1, (size // 2) ** 2, dim) * 0.02)
        self.t_embedder = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.y_embedder = nn.Embedding(num_classes + 1, dim)
        self.blocks = nn.ModuleList(HandBlock(dim, heads) for _ in range(depth))
        self.final_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.final_adaLN = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.final_linear = nn.Linear(dim, channels * 4)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        batch, channels, size, _ = x.shape
        patches = x.reshape(batch, channels, size // 2, 2, size // 2, 2).permute(0, 2, 4, 1, 3, 5)
        h = self.x_embedder(patches.reshape(batch, (size // 2) ** 2, channels * 4)) + self.pos
        c = self.t_embedder(timestep_embedding(t, self.dim)) + self.y_embedder(y)
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.final_adaLN(c).chunk(2, dim=1)
        out = self.final_linear(modulate(self.final_norm(h), shift, scale))
        out = out.reshape(batch, size // 2, size // 2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return out.reshape(batch, channels, size, size)


def hand_dit(seed: int = 0) -> HandDiT:
    torch.manual_seed(seed)
    return HandDiT().eval()


def hand_dit_inputs(batch: int = 2, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, 4, 8, 8, generator=generator),
        torch.randint(0, 1000, (batch,), generator=generator),
        torch.randint(0, 10, (batch,), generator=generator),
    )


def dit_inputs(batch: int, seed: int = 3) -> dict:
    """Keyword inputs of a tiny diffusers DiT (4 channels, 8x8, 10 classes) for `batch` images."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(batch, 4, 8, 8, generator=generator),
        "timestep": torch.randint(0, 1000, (batch,), generator=generator),
        "class_labels": torch.randint(0, 10, (batch,), generator=generator),
    }


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||."""
    return float((a - b).norm() / b.norm())


def layer_inputs_and_outputs(model: nn.Module, name: str, samples: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input, output) of the submodule `name` at every call while `model` runs each sample (forward hooks)."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    hook = model.get_submodule(name).register_forward_hook(lambda module, args, out: seen.append((args[0], out)))
    try:
        with torch.no_grad():
            for sample in samples:
                model(**sample)
    finally:
        hook.remove()
    return seen
