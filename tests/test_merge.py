"""q, k and v as one GEMM (dqcompile/backends/merge.py): stacked weights from the lowering, a bit-identical
merged int_linear in the backend's rewrite, and no merge where the weights are not stacked."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_models import dit_inputs, tiny_dit

import dqcompile
from dqcompile.backends.compile import RewriteSummary, rewrite_graph
from dqcompile.backends.merge import stacked_view

LAYERS = 2
SIBLINGS = ("attn1.to_q", "attn1.to_k", "attn1.to_v")


@pytest.fixture(scope="module", params=["w8a8", "qdit-w4a8"])  # int8 per channel; packed int4 in groups
def qmodel(request: pytest.FixtureRequest) -> dqcompile.QuantizedModel:
    torch.manual_seed(0)
    return dqcompile.quantize(tiny_dit(num_layers=LAYERS), request.param, progress=False)


def _qkv_weights(qmodel: dqcompile.QuantizedModel, block: int) -> list[torch.Tensor]:
    return [qmodel.graph_module.get_buffer(f"transformer_blocks.{block}.{name}.qweight") for name in SIBLINGS]


def _compiled_rewrite(qmodel: dqcompile.QuantizedModel, inputs: dict[str, Any], *, merge: bool,
                      fuse: bool = True) -> tuple[torch.Tensor, RewriteSummary, Counter]:
    """The backend's rewrite on dynamo's graph (with the real example inputs, as torch.compile passes
    them), run eagerly on the reference kernels."""
    torch._dynamo.reset()
    seen: list[tuple[RewriteSummary, Counter]] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> Any:
        summary = rewrite_graph(gm, kernels="reference", fuse=fuse, merge=merge, example_inputs=example_inputs)
        seen.append((summary, Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function")))
        return gm.forward

    output = torch.compile(qmodel, backend=backend)(**inputs).sample
    assert len(seen) == 1
    return output, *seen[0]


def test_lowering_stacks_the_sibling_weights(qmodel: dqcompile.QuantizedModel) -> None:
    for block in range(LAYERS):
        weights = _qkv_weights(qmodel, block)
        stacked = stacked_view(weights)
        assert stacked is not None and stacked.shape[0] == sum(w.shape[0] for w in weights)
        for name, weight in zip(SIBLINGS, weights):  # the plan holds the very view, not a second copy
            assert qmodel.plan.layers[f"transformer_blocks.{block}.{name}"].weight.qweight is weight
    # fc1 has no sibling: its weight owns its storage.
    fc1 = qmodel.graph_module.get_buffer("transformer_blocks.0.ff.net.0.proj.qweight")
    assert fc1.untyped_storage().nbytes() == fc1.numel() * fc1.element_size()


def test_merged_gemm_is_bit_identical(qmodel: dqcompile.QuantizedModel) -> None:
    inputs = dit_inputs(3)
    separate, summary_separate, ops_separate = _compiled_rewrite(qmodel, inputs, merge=False)
    merged, summary, ops = _compiled_rewrite(qmodel, inputs, merge=True)
    assert summary_separate.merged_linears == 0 and summary.merged_linears == LAYERS
    # Per block: q, k, v, to_out, fc1, fc2 -> (qkv), to_out, fc1, fc2.
    assert ops_separate["dqcompile.int_linear.default"] == 6 * LAYERS
    assert ops["dqcompile.int_linear.default"] == 4 * LAYERS
    assert torch.equal(merged, separate)
    assert torch.equal(merged, qmodel(**inputs).sample)


def test_without_the_fusion_the_merge_drops_the_duplicate_quantizers() -> None:
    """Unfused, q, k and v each have a quantizer of the same input: the merged GEMM reads q's, and k's and v's
    are erased (per block 4 quantizers instead of 6), with the same outputs."""
    qmodel = dqcompile.quantize(tiny_dit(num_layers=1), "w8a8", progress=False)
    inputs = dit_inputs(2)
    separate, _, ops_separate = _compiled_rewrite(qmodel, inputs, merge=False, fuse=False)
    merged, summary, ops = _compiled_rewrite(qmodel, inputs, merge=True, fuse=False)
    assert summary.merged_linears == 1
    assert ops_separate["dqcompile.quantize_act.default"] == 6 and ops["dqcompile.quantize_act.default"] == 4
    assert torch.equal(merged, separate)


def test_weights_not_stacked_are_not_merged() -> None:
    """A model whose q / k / v codes were replaced tensor by tensor (not views of one block) keeps three
    GEMMs, with the same outputs."""
    qmodel = dqcompile.quantize(tiny_dit(num_layers=1), "w8a8", progress=False)
    for name in SIBLINGS:
        owner = qmodel.graph_module.get_submodule(f"transformer_blocks.0.{name}")
        owner._buffers["qweight"] = owner.qweight.clone()
    inputs = dit_inputs(2)
    output, summary, _ = _compiled_rewrite(qmodel, inputs, merge=True)
    assert summary.merged_linears == 0
    assert torch.equal(output, qmodel(**inputs).sample)


def test_stacking_survives_moves_and_saves(tmp_path: Path) -> None:
    qmodel = dqcompile.quantize(tiny_dit(num_layers=1), "w4a8", progress=False)
    inputs = dit_inputs(2)
    expected = qmodel(**inputs).sample
    qmodel._apply(lambda t: t.clone())  # what .to(device) does: every buffer moved on its own
    weights = _qkv_weights(qmodel, 0)
    assert stacked_view(weights) is not None
    assert torch.equal(qmodel(**inputs).sample, expected)

    loaded = dqcompile.load(dqcompile.save(qmodel, tmp_path / "saved"))
    assert stacked_view(_qkv_weights(loaded, 0)) is not None
    assert torch.equal(loaded(**inputs).sample, expected)
