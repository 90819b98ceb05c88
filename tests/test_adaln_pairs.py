"""find_adaln_pairs: the exact adaLN -> linear and V -> output projection pairs of each model family."""

import torch
import torch.nn.functional as F
from torch import nn

import dqcompile
from dqcompile import AdaLNPair, AttentionPair
from dqcompile.graph import channel_rows, graph_view
from tiny_models import hand_dit, hand_dit_inputs, modulate, tiny_dit, tiny_pixart, tiny_sd3


def described(pairs):
    """Pairs without graph node names (those depend on torch.export's naming)."""
    adaln = [
        (p.norm, p.adaln, p.num_chunks, p.scale_chunk, p.shift_chunk, p.consumers, p.table)
        for p in pairs if isinstance(p, AdaLNPair)
    ]
    attention = [(p.values, p.value_row_offsets, p.outputs) for p in pairs if isinstance(p, AttentionPair)]
    return adaln, attention


def block_qkv(prefix, attn="attn1"):
    return tuple(f"{prefix}.{attn}.to_{x}" for x in "qkv")


def test_diffusers_dit_pairs():
    adaln, attention = described(dqcompile.find_adaln_pairs(tiny_dit()))
    expected = []
    for i in range(2):
        block = f"transformer_blocks.{i}"
        # AdaLayerNormZero: shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp
        expected += [
            (f"{block}.norm1.norm", f"{block}.norm1.linear", 6, 1, 0, block_qkv(block), None),
            (f"{block}.norm3", f"{block}.norm1.linear", 6, 4, 3, (f"{block}.ff.net.0.proj",), None),
        ]
    expected.append(("norm_out", "proj_out_1", 2, 1, 0, ("proj_out_2",), None))  # shift, scale = chunk(2)
    assert adaln == expected
    assert attention == [
        ((f"transformer_blocks.{i}.attn1.to_v",), (0,), (f"transformer_blocks.{i}.attn1.to_out.0",)) for i in range(2)
    ]


def test_sd3_pairs_follow_the_graph_for_the_reversed_chunk_order():
    adaln, attention = described(dqcompile.find_adaln_pairs(tiny_sd3()))
    b0, b1 = "transformer_blocks.0", "transformer_blocks.1"
    context0 = tuple(f"{b0}.attn.add_{x}_proj" for x in "qkv")
    context1 = tuple(f"{b1}.attn.add_{x}_proj" for x in "qkv")
    assert adaln == [
        (f"{b0}.norm1.norm", f"{b0}.norm1.linear", 6, 1, 0, block_qkv(b0, "attn"), None),
        (f"{b0}.norm1_context.norm", f"{b0}.norm1_context.linear", 6, 1, 0, context0, None),
        (f"{b0}.norm2", f"{b0}.norm1.linear", 6, 4, 3, (f"{b0}.ff.net.0.proj",), None),
        (f"{b0}.norm2_context", f"{b0}.norm1_context.linear", 6, 4, 3, (f"{b0}.ff_context.net.0.proj",), None),
        (f"{b1}.norm1.norm", f"{b1}.norm1.linear", 6, 1, 0, block_qkv(b1, "attn"), None),
        # The last block's context and the output norm are AdaLayerNormContinuous: scale, shift = chunk(2).
        (f"{b1}.norm1_context.norm", f"{b1}.norm1_context.linear", 2, 0, 1, context1, None),
        (f"{b1}.norm2", f"{b1}.norm1.linear", 6, 4, 3, (f"{b1}.ff.net.0.proj",), None),
        ("norm_out.norm", "norm_out.linear", 2, 0, 1, ("proj_out",), None),
    ]
    # Joint attention: image and context values are concatenated over tokens, and both output
    # projections read slices of the one attention output; the last block has no context output.
    assert attention == [
        ((f"{b0}.attn.to_v", f"{b0}.attn.add_v_proj"), (0, 0), (f"{b0}.attn.to_add_out", f"{b0}.attn.to_out.0")),
        ((f"{b1}.attn.to_v", f"{b1}.attn.add_v_proj"), (0, 0), (f"{b1}.attn.to_out.0",)),
    ]


def test_pixart_pairs_go_through_the_scale_shift_table():
    pairs = dqcompile.find_adaln_pairs(tiny_pixart())
    adaln, attention = described(pairs)
    expected = []
    for i in range(2):
        block = f"transformer_blocks.{i}"
        table = f"{block}.scale_shift_table"
        expected += [
            (f"{block}.norm1", "adaln_single.linear", 6, 1, 0, block_qkv(block), table),
            (f"{block}.norm2", "adaln_single.linear", 6, 4, 3, (f"{block}.ff.net.0.proj",), table),
        ]
    # The final layer adds the timestep embedding to its own table: shift, scale = chunk(2).
    expected.append(("norm_out", "adaln_single.emb.timestep_embedder.linear_2", 2, 1, 0, ("proj_out",),
                     "scale_shift_table"))
    assert adaln == expected
    assert all(p.table_add is not None for p in pairs if isinstance(p, AdaLNPair))
    # Self-attention and cross-attention (whose V reads the caption) both balance their output.
    assert attention == [
        ((f"transformer_blocks.{i}.{attn}.to_v",), (0,), (f"transformer_blocks.{i}.{attn}.to_out.0",))
        for i in range(2) for attn in ("attn1", "attn2")
    ]


def test_hand_written_dit_with_fused_qkv():
    captured = dqcompile.capture(hand_dit(), hand_dit_inputs(2))
    adaln, attention = described(dqcompile.find_adaln_pairs(captured))
    expected = []
    for i in range(2):
        # Original DiT order: shift, scale, gate for attention, then for the MLP.
        expected += [
            (f"blocks.{i}.norm1", f"blocks.{i}.adaLN_modulation.1", 6, 1, 0, (f"blocks.{i}.qkv",), None),
            (f"blocks.{i}.norm2", f"blocks.{i}.adaLN_modulation.1", 6, 4, 3, (f"blocks.{i}.fc1",), None),
        ]
    expected.append(("final_norm", "final_adaLN.1", 2, 1, 0, ("final_linear",), None))
    assert adaln == expected
    # V is the last third of the fused qkv rows: width 32, so rows 64..95.
    assert attention == [((f"blocks.{i}.qkv",), (64,), (f"blocks.{i}.proj",)) for i in range(2)]


class FoldHazards(nn.Module):
    """Four modulated LayerNorms; only the third can be folded."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.ada = nn.Linear(dim, 8 * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.a, self.b, self.c, self.d = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        chunks = self.ada(c).chunk(8, dim=1)
        h = modulate(self.norm(x), chunks[0], chunks[1])
        x = x + self.a(h) + F.gelu(h)  # h also feeds a GELU: dividing h by b would change it
        h = modulate(self.norm(x), chunks[2], chunks[3])
        x = x + self.b(h) + chunks[3].unsqueeze(1)  # the scale chunk is read elsewhere too
        h = modulate(self.norm(x), chunks[4], chunks[5])
        x = x + self.c(h)  # foldable
        h = modulate(self.norm(x), chunks[6], chunks[7])
        x = x + self.d(h)
        h = modulate(self.norm(x), chunks[6], chunks[7])  # two LayerNorms share one scale and shift
        return x + self.d(h)


def test_candidates_the_fold_cannot_take_are_left_out():
    captured = dqcompile.capture(FoldHazards().eval(), (torch.randn(2, 5, 16), torch.randn(2, 16)))
    kinds = [data["kind"] for _, data in graph_view(captured.graph_module).nodes(data=True)]
    assert kinds.count("norm") == 5 and kinds.count("add_one") == 5  # every candidate is in the view
    adaln, attention = described(dqcompile.find_adaln_pairs(captured))
    assert adaln == [("norm", "ada", 8, 5, 4, ("c",), None)] and attention == []


def test_model_without_adaln_has_no_pairs():
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 4)).eval()
    assert dqcompile.find_adaln_pairs(model, (torch.randn(2, 8),)) == []


def test_channel_rows_reads_codes_and_refuses_mixed_channels():
    codes = torch.tensor([[4.0, 5.0, torch.nan], [4.0, torch.nan, torch.nan]])
    assert channel_rows(codes).tolist() == [4, 5, -1]
    assert channel_rows(torch.tensor([[1.0, 2.0], [2.0, 1.0]])) is None
