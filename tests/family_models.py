"""Tiny random configurations of diffusers' DiT-family transformer classes and inputs for them.

Each family is (builder, inputs): `builder()` returns the model in eval mode (fixed seed),
`inputs(batch, seed)` keyword inputs of its forward for `batch` samples, as its pipeline passes them.
Every config is as small as the class allows (one or two blocks, 2 heads, widths of 16-32), so a
family's capture and quantization take seconds on a CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(generator: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=generator)


def _timestep(generator: torch.Generator, batch: int, high: int = 1000) -> torch.Tensor:
    return torch.randint(0, high, (batch,), generator=generator)


def _build(cls_name: str, **config: Any) -> Callable[[], torch.nn.Module]:
    def builder(seed: int = 0) -> torch.nn.Module:
        import diffusers

        torch.manual_seed(seed)
        return getattr(diffusers, cls_name)(**config).eval()

    builder.__name__ = cls_name
    return builder


# ------------------------------------------------------------------------------------------ the families

def _dit_inputs(batch: int, seed: int = 3) -> dict:
    g = _gen(seed)
    return {"hidden_states": _randn(g, batch, 4, 8, 8), "timestep": _timestep(g, batch),
            "class_labels": torch.randint(0, 10, (batch,), generator=g)}


def _pixart_inputs(batch: int, seed: int = 3) -> dict:
    g = _gen(seed)
    return {"hidden_states": _randn(g, batch, 4, 8, 8), "encoder_hidden_states": _randn(g, batch, 8, 24),
            "timestep": _timestep(g, batch), "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}


def _sd3_inputs(batch: int, seed: int = 3) -> dict:
    g = _gen(seed)
    return {"hidden_states": _randn(g, batch, 4, 8, 8), "encoder_hidden_states": _randn(g, batch, 8, 24),
            "pooled_projections": _randn(g, batch, 16), "timestep": _timestep(g, batch)}


def _flux_inputs(batch: int, seed: int = 3) -> dict:
    g = _gen(seed)
    img_ids = torch.zeros(16, 3)
    img_ids[:, 1] = torch.arange(16) // 4
    img_ids[:, 2] = torch.arange(16) % 4
    return {"hidden_states": _randn(g, batch, 16, 8), "encoder_hidden_states": _randn(g, batch, 6, 32),
            "pooled_projections": _randn(g, batch, 16), "timestep": torch.rand(batch, generator=g),
            "img_ids": img_ids, "txt_ids": torch.zeros(6, 3)}


def _hunyuan_video_inputs(batch: int, seed: int = 3) -> dict:
    g = _gen(seed)
    return {"hidden_states": _randn(g, batch, 4, 1, 8, 8), "timestep": _timestep(g, batch),
            "encoder_hidden_states": _randn(g, batch, 6, 16), "encoder_attention_mask": torch.ones(batch, 6),
            "pooled_projections": _randn(g, batch, 8), "guidance": torch.full((batch,), 3500.0)}


def _allegro_inputs(batch: int, seed: int = 3) -> dict:
    g = _gen(seed)
    return {"hidden_states": _randn(g, batch, 4, 2, 8, 8), "encoder_hidden_states": _randn(g, batch, 6, 16),
            "timestep": _timestep(g, batch)}


def _qwen_image_inputs(batch: int, seed: int = 3) -> dict:
    g = _gen(seed)
    return {"hidden_states": _randn(g, batch, 16, 16), "encoder_hidden_states": _randn(g, batch, 6, 16),
            "encoder_hidden_states_mask": torch.ones(batch, 6), "timestep": torch.rand(batch, generator=g),
            "img_shapes": [[(1, 4, 4)]] * batch}


def _cogvideox_inputs(batch: int, seed: int = 3) -> dict:
    g = _gen(seed)
    return {"hidden_states": _randn(g, batch, 1, 4, 8, 8), "encoder_hidden_states": _randn(g, batch, 8, 16),
            "timestep": _timestep(g, batch)}


def _sana_inputs(batch: int, seed: int = 3) -> dict:
    g = _gen(seed)
    return {"hidden_states": _randn(g, batch, 4, 8, 8), "encoder_hidden_states": _randn(g, batch, 6, 16),
            "timestep": _timestep(g, batch)}


def _hunyuan_dit_inputs(batch: int, seed: int = 3) -> dict:
    from diffusers.models.embeddings import get_2d_rotary_pos_embed

    g = _gen(seed)
    rope = get_2d_rotary_pos_embed(8, ((0, 0), (4, 4)), (4, 4))
    return {"hidden_states": _randn(g, batch, 4, 8, 8), "timestep": _timestep(g, batch).float(),
            "encoder_hidden_states": _randn(g, batch, 4, 16), "text_embedding_mask": torch.ones(batch, 4),
            "encoder_hidden_states_t5": _randn(g, batch, 4, 16), "text_embedding_mask_t5": torch.ones(batch, 4),
            "image_meta_size": torch.tensor([[8, 8, 8, 8, 0, 0]] * batch, dtype=torch.float32),
            "style": torch.zeros(batch, dtype=torch.long), "image_rotary_emb": rope}


def _ltx_inputs(batch: int, seed: int = 3) -> dict:
    g = _gen(seed)
    return {"hidden_states": _randn(g, batch, 2 * 4 * 4, 8), "encoder_hidden_states": _randn(g, batch, 6, 16),
            "timestep": _timestep(g, batch), "encoder_attention_mask": torch.ones(batch, 6),
            "num_frames": 2, "height": 4, "width": 4}


def _wan_inputs(batch: int, seed: int = 3) -> dict:
    g = _gen(seed)
    return {"hidden_states": _randn(g, batch, 4, 2, 8, 8), "timestep": _timestep(g, batch),
            "encoder_hidden_states": _randn(g, batch, 6, 16)}


def _auraflow_inputs(batch: int, seed: int = 3) -> dict:
    g = _gen(seed)
    return {"hidden_states": _randn(g, batch, 4, 8, 8), "encoder_hidden_states": _randn(g, batch, 6, 16),
            "timestep": torch.rand(batch, generator=g)}


def _stable_audio_inputs(batch: int, seed: int = 3) -> dict:
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    g = _gen(seed)
    rope = get_1d_rotary_pos_embed(8 // 2, 8 + 1, use_real=True, repeat_interleave_real=False)
    return {"hidden_states": _randn(g, batch, 4, 8), "timestep": _timestep(g, batch),
            "encoder_hidden_states": _randn(g, batch, 6, 16), "global_hidden_states": _randn(g, batch, 1, 16),
            "rotary_embedding": rope}


# name -> (builder, inputs)
FAMILIES: dict[str, tuple[Callable[..., torch.nn.Module], Callable[..., dict]]] = {
    "dit": (_build("DiTTransformer2DModel", num_attention_heads=2, attention_head_dim=16, in_channels=4,
                   out_channels=8, num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
                   norm_type="ada_norm_zero"), _dit_inputs),
    "pixart": (_build("PixArtTransformer2DModel", num_attention_heads=2, attention_head_dim=16, in_channels=4,
                      out_channels=8, num_layers=2, sample_size=8, patch_size=2, cross_attention_dim=32,
                      caption_channels=24, norm_type="ada_norm_single", num_embeds_ada_norm=1000), _pixart_inputs),
    "sd3": (_build("SD3Transformer2DModel", sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24, caption_projection_dim=32,
                   pooled_projection_dim=16, pos_embed_max_size=16), _sd3_inputs),
    "flux": (_build("FluxTransformer2DModel", patch_size=1, in_channels=8, num_layers=1, num_single_layers=1,
                    attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
                    axes_dims_rope=(4, 4, 8)), _flux_inputs),
    "hunyuan_video": (_build("HunyuanVideoTransformer3DModel", in_channels=4, out_channels=4, num_attention_heads=2,
                             attention_head_dim=16, num_layers=1, num_single_layers=1, num_refiner_layers=1,
                             patch_size=2, patch_size_t=1, guidance_embeds=True, text_embed_dim=16,
                             pooled_projection_dim=8, rope_axes_dim=(4, 6, 6)), _hunyuan_video_inputs),
    "allegro": (_build("AllegroTransformer3DModel", num_attention_heads=2, attention_head_dim=16, in_channels=4,
                       out_channels=4, num_layers=1, cross_attention_dim=32, sample_width=8, sample_height=8,
                       sample_frames=8, caption_channels=16), _allegro_inputs),
    "qwen_image": (_build("QwenImageTransformer2DModel", patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                          attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                          axes_dims_rope=(8, 4, 4)), _qwen_image_inputs),
    "cogvideox": (_build("CogVideoXTransformer3DModel", num_attention_heads=2, attention_head_dim=16, in_channels=4,
                         out_channels=4, time_embed_dim=16, text_embed_dim=16, num_layers=1, sample_width=8,
                         sample_height=8, sample_frames=1, patch_size=2, temporal_compression_ratio=4,
                         max_text_seq_length=8), _cogvideox_inputs),
    "sana": (_build("SanaTransformer2DModel", patch_size=1, in_channels=4, out_channels=4, num_layers=1,
                    attention_head_dim=16, num_attention_heads=2, num_cross_attention_heads=2,
                    cross_attention_head_dim=16, cross_attention_dim=32, caption_channels=16, sample_size=8),
             _sana_inputs),
    "hunyuan_dit": (_build("HunyuanDiT2DModel", sample_size=8, patch_size=2, in_channels=4, num_layers=2,
                           attention_head_dim=8, num_attention_heads=2, cross_attention_dim=16,
                           cross_attention_dim_t5=16, pooled_projection_dim=16, hidden_size=16, text_len=4,
                           text_len_t5=4), _hunyuan_dit_inputs),
    "ltx_video": (_build("LTXVideoTransformer3DModel", in_channels=8, out_channels=8, patch_size=1, patch_size_t=1,
                         num_attention_heads=2, attention_head_dim=16, cross_attention_dim=32, num_layers=1,
                         caption_channels=16), _ltx_inputs),
    "wan": (_build("WanTransformer3DModel", patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16,
                   in_channels=4, out_channels=4, text_dim=16, freq_dim=32, ffn_dim=64, num_layers=1,
                   rope_max_seq_len=32), _wan_inputs),
    "auraflow": (_build("AuraFlowTransformer2DModel", sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=1,
                        num_single_dit_layers=1, attention_head_dim=16, num_attention_heads=2,
                        caption_projection_dim=32, joint_attention_dim=16, out_channels=4, pos_embed_max_size=64),
                 _auraflow_inputs),
    "stable_audio": (_build("StableAudioDiTModel", sample_size=8, in_channels=4, num_layers=2, attention_head_dim=8,
                            num_attention_heads=2, num_key_value_attention_heads=2, out_channels=4,
                            cross_attention_dim=16, time_proj_dim=16, global_states_input_dim=16,
                            cross_attention_input_dim=16), _stable_audio_inputs),
}


def family(name: str, seed: int = 0) -> tuple[torch.nn.Module, Callable[..., dict]]:
    builder, inputs = {**FAMILIES, **UNCAPTURED}[name]
    return builder(seed), inputs


# ------------------------------------------------------------------------------------------ families whose code
# torch.export cannot capture with a dynamic batch (see dqcompile.capture's fallback)

def _lumina2_inputs(batch: int, seed: int = 3) -> dict:
    g = _gen(seed)
    return {"hidden_states": _randn(g, batch, 4, 8, 8), "timestep": torch.rand(batch, generator=g),
            "encoder_hidden_states": _randn(g, batch, 6, 16), "encoder_attention_mask": torch.ones(batch, 6, dtype=torch.bool)}


def _cosmos_inputs(batch: int, seed: int = 3) -> dict:
    g = _gen(seed)
    return {"hidden_states": _randn(g, batch, 4, 1, 8, 8), "timestep": _timestep(g, batch).float(),
            "encoder_hidden_states": _randn(g, batch, 6, 16), "padding_mask": torch.zeros(1, 1, 8, 8)}


def _mochi_inputs(batch: int, seed: int = 3) -> dict:
    g = _gen(seed)
    return {"hidden_states": _randn(g, batch, 4, 2, 8, 8), "encoder_hidden_states": _randn(g, batch, 6, 16),
            "timestep": _timestep(g, batch), "encoder_attention_mask": torch.ones(batch, 6, dtype=torch.bool)}


def _lumina_next_inputs(batch: int, seed: int = 3) -> dict:
    from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

    g = _gen(seed)
    rope = get_2d_rotary_pos_embed_lumina(16, 384, 384, linear_factor=1.0, ntk_factor=1.0)
    return {"hidden_states": _randn(g, batch, 4, 8, 8), "timestep": torch.rand(batch, generator=g),
            "encoder_hidden_states": _randn(g, batch, 6, 16), "encoder_mask": torch.ones(batch, 6),
            "image_rotary_emb": rope, "cross_attention_kwargs": {}}


def _chroma_inputs(batch: int, seed: int = 3) -> dict:
    inputs = _flux_inputs(batch, seed)
    inputs.pop("pooled_projections")
    return inputs


def _omnigen_inputs(batch: int, seed: int = 3) -> dict:
    g = _gen(seed)
    tokens = 6 + 1 + 16  # text, time, image patches
    return {"hidden_states": _randn(g, batch, 4, 8, 8), "timestep": torch.rand(batch, generator=g),
            "input_ids": torch.randint(0, 100, (batch, 6), generator=g), "input_img_latents": [],
            "input_image_sizes": {}, "attention_mask": torch.ones(batch, tokens, tokens),
            "position_ids": torch.arange(tokens).repeat(batch, 1)}


def _hidream_inputs(batch: int, seed: int = 3) -> dict:
    g = _gen(seed)
    return {"hidden_states": _randn(g, batch, 4, 8, 8), "timesteps": _timestep(g, batch),
            "encoder_hidden_states_t5": _randn(g, batch, 6, 16),
            "encoder_hidden_states_llama3": _randn(g, 2, batch, 6, 16),
            "pooled_embeds": _randn(g, batch, 16)}


UNCAPTURED: dict[str, tuple[Callable[..., torch.nn.Module], Callable[..., dict]]] = {
    "lumina2": (_build("Lumina2Transformer2DModel", sample_size=8, patch_size=2, in_channels=4, hidden_size=32,
                       num_layers=1, num_refiner_layers=1, num_attention_heads=2, num_kv_heads=2, multiple_of=16,
                       axes_dim_rope=(4, 6, 6), axes_lens=(32, 32, 32), cap_feat_dim=16), _lumina2_inputs),
    "cosmos": (_build("CosmosTransformer3DModel", in_channels=4, out_channels=4, num_attention_heads=2,
                      attention_head_dim=16, num_layers=1, mlp_ratio=2, text_embed_dim=16, adaln_lora_dim=4,
                      max_size=(4, 16, 16), patch_size=(1, 2, 2), rope_scale=(2.0, 1.0, 1.0),
                      concat_padding_mask=True, extra_pos_embed_type="learnable"), _cosmos_inputs),
    "mochi": (_build("MochiTransformer3DModel", patch_size=2, num_attention_heads=2, attention_head_dim=16,
                     num_layers=1, pooled_projection_dim=16, in_channels=4, text_embed_dim=16, time_embed_dim=8),
              _mochi_inputs),
    "lumina_next": (_build("LuminaNextDiT2DModel", sample_size=8, patch_size=2, in_channels=4, hidden_size=32,
                           num_layers=1, num_attention_heads=2, num_kv_heads=2, multiple_of=16,
                           cross_attention_dim=16, learn_sigma=False), _lumina_next_inputs),
    "chroma": (_build("ChromaTransformer2DModel", patch_size=1, in_channels=8, num_layers=1, num_single_layers=1,
                      attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 4, 8),
                      approximator_num_channels=8, approximator_hidden_dim=32, approximator_layers=1),
               _chroma_inputs),
    "omnigen": (_build("OmniGenTransformer2DModel", in_channels=4, patch_size=2, hidden_size=32, num_attention_heads=2,
                       num_key_value_heads=2, intermediate_size=64, num_layers=1, pad_token_id=0, vocab_size=100,
                       time_step_dim=16, pos_embed_max_size=16,
                       rope_scaling={"short_factor": [1.0] * 8, "long_factor": [1.0] * 8}), _omnigen_inputs),
    "hidream": (_build("HiDreamImageTransformer2DModel", patch_size=2, in_channels=4, out_channels=4, num_layers=1,
                       num_single_layers=1, attention_head_dim=16, num_attention_heads=2, caption_channels=[16, 16],
                       text_emb_dim=16, num_routed_experts=2, num_activated_experts=1, axes_dims_rope=(8, 4, 4),
                       max_resolution=(16, 16), llama_layers=[0, 1]), _hidream_inputs),
}
