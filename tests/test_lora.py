"""LoRA on a quantized model without re-quantizing: a float branch beside the integer GEMMs."""

from __future__ import annotations

import copy

import pytest
import torch

import dqcompile
from dqcompile.integrations import lora
from tiny_models import dit_inputs, rel_l2, tiny_dit

TARGETS = ("transformer_blocks.0.attn1.to_q", "transformer_blocks.0.attn1.to_v", "transformer_blocks.1.ff.net.2",
           "proj_out_2")  # three quantized layers and one kept in float


def make_lora(model, seed: int, rank: int = 4, scale: float = 0.5) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name in TARGETS:
        weight = model.get_parameter(f"{name}.weight")
        state[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, weight.shape[1], generator=generator) * scale
        state[f"transformer.{name}.lora_B.weight"] = torch.randn(weight.shape[0], rank, generator=generator) * scale / rank
    return state


def merged(model, state: dict[str, torch.Tensor], weight: float = 1.0):
    """The float model with the LoRA merged into its weights (the reference)."""
    model = copy.deepcopy(model)
    layers = lora.parse_lora(state)
    with torch.no_grad():
        for name, (a, b, alpha_scale) in layers.items():
            model.get_parameter(f"{name}.weight").add_(weight * alpha_scale * (b @ a))
    return model


@pytest.fixture(scope="module")
def setup():
    model = tiny_dit()
    return model, dqcompile.quantize(model, "w8a8", progress=False)


def out(model, inputs):
    with torch.no_grad():
        return model(**inputs).sample


def test_lora_matches_float_lora_within_the_quantization_error(setup):
    model, qmodel = setup
    inputs = dit_inputs(3)
    base = out(qmodel, inputs)
    quant_error = rel_l2(base, out(model, inputs))
    state = make_lora(model, seed=1)
    qweight = qmodel.graph_module.get_buffer("transformer_blocks.0.attn1.to_q.qweight").clone()
    qmodel.load_lora_weights(state, "style")
    try:
        with_lora, reference = out(qmodel, inputs), out(merged(model, state), inputs)
        assert rel_l2(with_lora, base) > 10 * quant_error  # the adapter changes the output
        assert rel_l2(with_lora, reference) < 2 * quant_error
        assert torch.equal(qmodel.graph_module.get_buffer("transformer_blocks.0.attn1.to_q.qweight"), qweight)
        # scale, disable / enable
        lora.set_adapters(qmodel, "style", 0.5)
        assert rel_l2(out(qmodel, inputs), out(merged(model, state, 0.5), inputs)) < 2 * quant_error
        lora.disable_lora(qmodel)
        assert torch.equal(out(qmodel, inputs), base)
        lora.enable_lora(qmodel)
        # a second adapter beside the first, then a hot swap of the first in place
        other = make_lora(model, seed=2)
        qmodel.load_lora_weights(other, "other")
        lora.set_adapters(qmodel, ["style", "other"], [1.0, 1.0])
        both = merged(merged(model, state), other)
        assert rel_l2(out(qmodel, inputs), out(both, inputs)) < 2 * quant_error
        swapped = make_lora(model, seed=3)
        nodes = len(qmodel.graph_module.graph.nodes)
        lora.load_lora_weights(qmodel, swapped, "style", hotswap=True)
        assert len(qmodel.graph_module.graph.nodes) == nodes  # no graph rewrite: a compiled model keeps its code
        assert rel_l2(out(qmodel, inputs), out(merged(merged(model, swapped), other), inputs)) < 2 * quant_error
        lora.delete_adapters(qmodel, "other")
        assert lora.get_active_adapters(qmodel) == ["style"]
    finally:
        qmodel.unload_lora_weights()
    assert torch.equal(out(qmodel, inputs), base)


def test_lora_is_not_saved_and_bad_adapters_are_refused(setup, tmp_path):
    model, qmodel = setup
    qmodel.load_lora_weights(make_lora(model, seed=4), "tmp")
    try:
        dqcompile.save(qmodel, tmp_path / "saved")
        loaded = dqcompile.load(tmp_path / "saved")
        inputs = dit_inputs(2)
        qmodel.set_adapters([])
        assert torch.equal(out(loaded, inputs), out(qmodel, inputs))
        with pytest.raises(ValueError, match="no linear layer"):
            qmodel.load_lora_weights({"nope.lora_A.weight": torch.zeros(2, 4), "nope.lora_B.weight": torch.zeros(4, 2)})
        with pytest.raises(ValueError, match="do not fit"):
            bad = {"transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(2, 5),
                   "transformer_blocks.0.attn1.to_q.lora_B.weight": torch.zeros(32, 2)}
            qmodel.load_lora_weights(bad, "bad")
    finally:
        qmodel.unload_lora_weights()
