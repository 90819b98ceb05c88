"""Q-DiT: per-layer group quantization (exact integer math), per-sample dynamic activations, GPTQ,
fitted group sizes and the qdit presets."""

import pytest
import torch

import dqcompile
from dqcompile import ActivationSpec, QuantSpec, WeightSpec
from dqcompile.passes.gptq import gptq_quantize
from dqcompile.quant import QuantizedWeight, quantize_weight
from dqcompile.spec import fit_group_size
from tiny_models import dit_inputs, rel_l2, tiny_dit

OPS = torch.ops.dqcompile




def lowered_nodes(qmodel, layer: str, op) -> list:
    return [
        node for node in qmodel.graph_module.graph.nodes
        if node.op == "call_function" and node.target == op.default and node.meta["dqcompile"]["layer"] == layer
    ]


# Per-layer group sizes: q in groups of 16, fc2 (128 wide) of 64, every other layer of 32.
PER_LAYER = QuantSpec(
    weights=WeightSpec(bits=4, group_size=32),
    activations=ActivationSpec(mode="dynamic_group"),
    group_sizes=(("*attn1.to_q", 16), ("*ff.net.2", 64)),
)


@pytest.fixture(scope="module")
def per_layer_model():
    return dqcompile.quantize(tiny_dit(), PER_LAYER, progress=False)


@pytest.mark.parametrize("layer,group,width", [
    ("transformer_blocks.0.attn1.to_q", 16, 32),
    ("transformer_blocks.1.attn1.to_k", 32, 32),
    ("transformer_blocks.0.ff.net.2", 64, 128),
])
def test_per_layer_groups_are_exact_integer_sums_per_group(per_layer_model, layer, group, width):
    owner = per_layer_model.graph_module.get_submodule(layer)
    assert owner.weight_scale.shape == (owner.weight_scale.shape[0], width // group)
    (linear,) = lowered_nodes(per_layer_model, layer, OPS.int_linear)
    (act,) = lowered_nodes(per_layer_model, layer, OPS.quantize_act)
    assert linear.args[7] == group and act.args[2] == group  # weights and activations share the layer's g

    # The layer's own integer weights against activations quantized with its group size; the reference
    # sums each group's products in int64 (no overflow possible), then runs int_linear's float epilogue
    # in the same order, so the results must agree bit for bit.
    x = torch.randn(3, 5, width, generator=torch.Generator().manual_seed(0)) * 4
    qx, x_scale, x_zero = OPS.quantize_act(x, 8, group, False)
    bias = per_layer_model.graph_module.get_submodule(layer).get_parameter("bias")
    y = OPS.int_linear(qx, x_scale, x_zero, owner.qweight, owner.weight_scale, bias, 4, group, torch.float32)

    codes = QuantizedWeight(owner.qweight, owner.weight_scale, 4, group).codes().long()
    rows, scales, zeros = qx.reshape(-1, width).long(), x_scale.reshape(-1, width // group), x_zero.reshape(-1, width // group)
    expected = torch.zeros(rows.shape[0], codes.shape[0])
    for j in range(width // group):
        cols = slice(j * group, (j + 1) * group)
        centered = (rows[:, cols] - zeros[:, j, None].long()) @ codes[:, cols].T
        assert centered.abs().max() < 2**31  # what int_linear accumulates fits int32
        expected += (scales[:, j, None] * owner.weight_scale[:, j]) * centered.float()
    expected += bias.float()
    assert torch.equal(y.reshape(-1, codes.shape[0]), expected)


def test_per_layer_groups_run_close_to_float(per_layer_model):
    model, inputs = tiny_dit(), dit_inputs(batch=3)
    with torch.no_grad():
        assert rel_l2(per_layer_model(**inputs).sample, model(**inputs).sample) < 0.1  # 4-bit groups: ~2e-2
    rows = {row.name: row for row in per_layer_model.report.layers}
    assert rows["transformer_blocks.0.attn1.to_q"].weights == "int4 group 16"
    assert rows["transformer_blocks.0.attn1.to_q"].activations == "int8 dynamic group 16, asym"


def test_group_size_that_does_not_divide_is_fitted_or_refused_with_the_layer_name():
    assert fit_group_size(128, 192) == 96 and fit_group_size(128, 768) == 128 and fit_group_size(128, 1152) == 128
    assert fit_group_size(64, 288) == 32  # a multiple of 32 (the Triton GEMM's) before 48
    assert fit_group_size(64, 48) == 48 and fit_group_size(128, 80) == 80  # only multiples of 16 divide these
    assert fit_group_size(128, 40) == 0  # no multiple of 16 divides 40
    refused = QuantSpec(weights=WeightSpec(bits=4, group_size=128), activations=ActivationSpec(mode="dynamic_group"))
    with pytest.raises(ValueError, match=r"layer transformer_blocks\.0\.attn1\.to_q: weights\.group_size=128 does not divide its 32"):
        dqcompile.quantize(tiny_dit(), refused, progress=False)
    weight, activations = QuantSpec.from_preset("qdit-w4a8").layer_plans("blocks.0.attn.qkv", in_features=192)
    assert (weight.group_size, activations.group_size, weight.fitted_from) == (96, 96, 128)


def test_spec_validation_and_group_plans(tmp_path):
    with pytest.raises(ValueError, match=r"weights\.rounding='adaround' is not allowed; allowed values: 'rtn', 'gptq'"):
        WeightSpec(rounding="adaround")
    with pytest.raises(ValueError, match=r"group size of '\*q' must be a positive integer"):
        QuantSpec(group_sizes=(("*q", 0),))
    with pytest.raises(ValueError, match=r"activations\.group_size=32 must be 0 with group_sizes"):
        QuantSpec(weights=WeightSpec(group_size=32), activations=ActivationSpec(mode="dynamic_group", group_size=32),
                  group_sizes=(("a", 16),))
    spec = QuantSpec.from_preset("qdit-w4a8")
    (tmp_path / "plan.json").write_text('{"group_sizes": {"blocks.0.fc2": 64, "blocks.0.fc1": 32}}')
    from_file = spec.with_group_plan(tmp_path / "plan.json")
    assert from_file == spec.with_group_plan({"blocks.0.fc1": 32, "blocks.0.fc2": 64})
    assert from_file.group_size("blocks.0.fc2") == 64
    assert from_file.group_size("blocks.1.fc2") == 128  # not in the plan: the spec's size
    assert QuantSpec.from_dict(from_file.to_dict()) == from_file


def test_per_sample_dynamic_quantization():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 64, generator=generator)
    x[1] *= 10
    q, scale, zero = OPS.quantize_act_per_sample(x, 8, 16, False)
    assert q.dtype == torch.int8 and scale.shape == zero.shape == (3, 1, 4)
    grouped = x.reshape(3, 5, 4, 16)
    low = grouped.amin(dim=(1, 3)).clamp_max(0)
    high = grouped.amax(dim=(1, 3)).clamp_min(0)
    torch.testing.assert_close(scale[:, 0], (high - low) / 255, rtol=1e-6, atol=0)  # min/max over all 5 tokens
    x_hat = (q.float().reshape(3, 5, 4, 16) - zero[:, :, :, None]) * scale[:, :, :, None]
    assert ((x_hat.reshape(x.shape) - x).abs() <= scale.repeat_interleave(16, -1) / 2 * 1.0001).all()
    other = x.clone()
    other[2] = 100.0  # another sample's values change nothing in sample 0
    q0, scale0, _ = OPS.quantize_act_per_sample(other, 8, 16, False)
    assert torch.equal(q0[0], q[0]) and torch.equal(scale0[0], scale[0])
    torch.library.opcheck(OPS.quantize_act_per_sample.default, (x, 8, 16, False))  # fake impl matches


def test_per_sample_activations_lower_and_run():
    spec = QuantSpec(weights=WeightSpec(bits=8, group_size=16), activations=ActivationSpec(mode="dynamic_sample_group"))
    model = tiny_dit()
    qmodel = dqcompile.quantize(model, spec, progress=False)
    assert lowered_nodes(qmodel, "transformer_blocks.0.attn1.to_q", OPS.quantize_act_per_sample)
    assert not lowered_nodes(qmodel, "transformer_blocks.0.attn1.to_q", OPS.quantize_act)
    inputs = dit_inputs(batch=3)
    with torch.no_grad():
        batched = qmodel(**inputs).sample
        alone = qmodel(**{key: value[:2] for key, value in inputs.items()}).sample
        assert rel_l2(batched, model(**inputs).sample) < 0.05  # 8-bit: ~1e-2
    # Each sample's scales come from its own tokens: a smaller batch gives the same outputs (up to
    # float rounding of the float layers at another batch size).
    torch.testing.assert_close(alone, batched[:2], rtol=1e-5, atol=1e-5)


def correlated_layer(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs whose channels are strongly correlated (a random mixing with decaying scales), and a weight."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(64, 64, generator=generator) * torch.logspace(0, -2, 64)[:, None]
    return torch.randn(2048, 64, generator=generator) @ mixing, torch.randn(32, 64, generator=generator)


@pytest.mark.parametrize("bits,group,act_order", [(4, 16, False), (4, 0, True), (6, 32, False)])
def test_gptq_output_error_below_rtn(bits, group, act_order):
    x, w = correlated_layer()
    hessian = 2 * x.T @ x / x.shape[0]
    gptq = gptq_quantize(w, hessian, bits, group, act_order=act_order)
    rtn = quantize_weight(w, bits, group)

    def output_error(q: QuantizedWeight) -> float:
        return float((x @ (w - q.dequantize()).T).square().mean())

    # GPTQ spreads each column's error over the correlated columns still to come: about 4-7x less output
    # error than RTN on these inputs; half is a margin no float noise reaches.
    assert output_error(gptq) < 0.5 * output_error(rtn)
    # Column blocks only batch the error updates: the codes do not depend on them.
    assert torch.equal(gptq_quantize(w, hessian, bits, group, act_order=act_order, block_size=16).codes(), gptq.codes())


def test_gptq_in_the_pipeline():
    model = tiny_dit()
    spec = QuantSpec.from_preset("qdit-w4a8").replace(weights=WeightSpec(bits=4, group_size=128, clip_search=True, rounding="gptq"))
    with pytest.raises(ValueError, match="needs calibration data"):
        dqcompile.quantize(model, spec, progress=False)
    calibration = [dit_inputs(batch=4, seed=seed) for seed in range(4)]
    qmodel = dqcompile.quantize(model, spec, calibration=calibration, progress=False)
    gm = qmodel.graph_module
    assert not hasattr(gm, "dqcompile_hessians") and all(n.op != "call_module" or n.target == "_guards_fn" for n in gm.graph.nodes)
    rows = {row.name: row for row in qmodel.report.layers}
    assert rows["transformer_blocks.1.ff.net.2"].note == "GPTQ (damping 0.01, block 128)"
    rtn = quantize_weight(model.transformer_blocks[0].ff.net[0].proj.weight, 4, 32, clip_search=True)
    assert not torch.equal(gm.get_submodule("transformer_blocks.0.ff.net.0.proj").qweight, rtn.qweight)
    inputs = dit_inputs(batch=3)
    with torch.no_grad():
        assert rel_l2(qmodel(**inputs).sample, model(**inputs).sample) < 0.1  # like RTN's: ~2e-2


@pytest.mark.parametrize("preset,bound", [("qdit-w4a8", 0.1), ("qdit-w6a8", 0.03)])
def test_qdit_presets_on_tiny_dit(tmp_path, preset, bound):
    model = tiny_dit()
    qmodel = dqcompile.quantize(model, preset, progress=False)
    inputs = dit_inputs(batch=3)
    with torch.no_grad():
        output = qmodel(**inputs).sample
        # measured: ~2e-2 (w4a8), ~5e-3 (w6a8)
        assert rel_l2(output, model(**inputs).sample) < bound
    rows = {row.name: row for row in qmodel.report.layers}
    bits = preset[-3]
    assert rows["transformer_blocks.0.attn1.to_q"].weights == f"int{bits} group 32 (fitted from 128), clip search"
    assert rows["transformer_blocks.0.ff.net.2"].weights == f"int{bits} group 128, clip search"
    if bits == "4":  # the spec's qdit options survive save and load (once is enough)
        dqcompile.save(qmodel, tmp_path / "q")
        with torch.no_grad():
            assert torch.equal(dqcompile.load(tmp_path / "q")(**inputs).sample, output)


def test_unit_gain_clip_search_through_the_pipeline(tmp_path):
    """weights.clip_unit_gain reaches the rounding (unit-gain groups), the report, and a save / load round
    trip of the plan; without clip_search it is refused when the spec is built."""
    with pytest.raises(ValueError, match="set weights.clip_search=True as well"):
        WeightSpec(bits=4, group_size=32, clip_unit_gain=True)
    model = tiny_dit()
    spec = QuantSpec.from_preset("qdit-w4a8").replace(
        weights=WeightSpec(bits=4, group_size=128, clip_search=True, clip_unit_gain=True))
    qmodel = dqcompile.quantize(model, spec, progress=False)
    rows = {row.name: row for row in qmodel.report.layers}
    assert rows["transformer_blocks.0.attn1.to_q"].weights == "int4 group 32 (fitted from 128), clip search (unit gain)"
    expected = quantize_weight(model.transformer_blocks[0].attn1.to_q.weight, 4, 32, clip_search=True, unit_gain=True)
    layer = qmodel.graph_module.get_submodule("transformer_blocks.0.attn1.to_q")
    assert torch.equal(layer.qweight, expected.qweight)
    plain = quantize_weight(model.transformer_blocks[0].attn1.to_q.weight, 4, 32, clip_search=True)
    assert not torch.equal(expected.scale, plain.scale)
    dqcompile.save(qmodel, tmp_path / "q")
    loaded = dqcompile.load(tmp_path / "q")
    inputs = dit_inputs(batch=2)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).sample, qmodel(**inputs).sample)
