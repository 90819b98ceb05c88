"""quantize(): a drop-in model on integer ops, its report, bad input, save and load."""

import re

import pytest
import torch
from torch import nn

import dqcompile
from dqcompile import ActivationSpec, QuantSpec, WeightSpec
from dqcompile.example_inputs import default_example_inputs
from tiny_models import dit_inputs, hand_dit, hand_dit_inputs, rel_l2, tiny_dit, tiny_pixart, tiny_sd3




@pytest.fixture(scope="module")
def dit_w8a8():
    model = tiny_dit()
    return model, dqcompile.quantize(model, "w8a8", progress=False)


def test_drop_in_output_type_config_dtype_device(dit_w8a8):
    model, qmodel = dit_w8a8
    inputs = dit_inputs(batch=5)
    out = qmodel(**inputs)
    assert type(out) is type(model(**inputs))
    assert out.sample.shape == (5, 8, 8, 8)
    as_tuple = qmodel(**inputs, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], out.sample)
    assert qmodel.config.sample_size == model.config.sample_size
    assert qmodel.dtype == torch.float32 and qmodel.device == torch.device("cpu")
    positional = qmodel(inputs["hidden_states"], inputs["timestep"], inputs["class_labels"])
    assert torch.equal(positional.sample, out.sample)


def test_w8a8_is_close_to_float_and_runs_integer_ops(dit_w8a8):
    model, qmodel = dit_w8a8
    inputs = dit_inputs(batch=4)
    with torch.no_grad():
        error = rel_l2(qmodel(**inputs).sample, model(**inputs).sample)
    assert error < 0.05  # 8-bit weights and activations on a random tiny DiT: ~1e-2
    targets = {str(n.target) for n in qmodel.graph_module.graph.nodes if n.op == "call_function"}
    assert "dqcompile.int_linear.default" in targets
    assert "aten.linear.default" in targets  # the adaLN / embedding linears stay float by default
    to_q = qmodel.graph_module.get_submodule("transformer_blocks.0.attn1.to_q")
    assert to_q.qweight.dtype == torch.int8 and "weight" not in dict(to_q.named_parameters())


def test_source_model_is_untouched(dit_w8a8):
    model, _ = dit_w8a8
    fresh = tiny_dit()
    for (name, a), (_, b) in zip(model.named_parameters(), fresh.named_parameters()):
        assert torch.equal(a, b), name


def test_report_lists_every_linear_with_a_reason(dit_w8a8):
    _, qmodel = dit_w8a8
    report = qmodel.report
    rows = {row.name: row for row in report.layers}
    assert rows["transformer_blocks.0.attn1.to_q"].weights == "int8 per channel"
    assert rows["transformer_blocks.0.attn1.to_q"].activations == "int8 dynamic per token, asym"
    assert "adaLN" in rows["transformer_blocks.0.norm1.linear"].note
    assert "final projection" in rows["proj_out_2"].note
    assert report.quantized_count == 12  # 2 blocks x (q, k, v, out, fc1, fc2)
    assert re.search(r"12 of \d+ linear layers quantized", str(report))


@pytest.mark.parametrize("preset,bound", [("w8a8", 0.05), ("w6a6", 0.25), ("w4a8", 0.5), ("w4a16", 0.5)])
def test_presets_on_hand_written_dit(preset, bound):
    model = hand_dit()
    qmodel = dqcompile.quantize(model, preset, example_inputs=hand_dit_inputs(2), progress=False)
    x, t, y = hand_dit_inputs(batch=3, seed=4)
    with torch.no_grad():
        assert rel_l2(qmodel(x, t, y), model(x, t, y)) < bound


def test_group_quantization_and_int4_weights_are_packed():
    spec = QuantSpec(weights=WeightSpec(bits=4, group_size=16), activations=ActivationSpec(mode="dynamic_group"))
    model = tiny_dit()
    qmodel = dqcompile.quantize(model, spec, progress=False)
    fc1 = qmodel.graph_module.get_submodule("transformer_blocks.0.ff.net.0.proj")
    assert fc1.qweight.dtype == torch.uint8 and fc1.qweight.shape == (128, 16)
    assert fc1.weight_scale.shape == (128, 2)
    inputs = dit_inputs(batch=2)
    with torch.no_grad():
        assert rel_l2(qmodel(**inputs).sample, model(**inputs).sample) < 0.5


@pytest.mark.parametrize("build", [tiny_pixart, tiny_sd3], ids=["pixart", "sd3"])
def test_other_families_quantize(build):
    model = build()
    qmodel = dqcompile.quantize(model, "w8a8", progress=False)
    inputs = default_example_inputs(model, batch=3)
    with torch.no_grad():
        assert rel_l2(qmodel(**inputs).sample, model(**inputs).sample) < 0.1
    assert qmodel.report.quantized_count > 0


def test_static_activations_calibrate_and_refuse_nan():
    model = tiny_dit()
    spec = QuantSpec.from_preset("w8a8").replace(activations=ActivationSpec(mode="static_tensor"))
    with pytest.raises(ValueError, match="needs calibration data"):
        dqcompile.quantize(model, spec, progress=False)
    samples = [dit_inputs(batch=2, seed=s) for s in range(3)]
    qmodel = dqcompile.quantize(model, spec, calibration=samples, progress=False)
    inputs = dit_inputs(batch=2, seed=1)
    with torch.no_grad():
        assert rel_l2(qmodel(**inputs).sample, model(**inputs).sample) < 0.1
    bad = dit_inputs(batch=2, seed=7)
    bad["hidden_states"][0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"calibration sample 1: argument 'hidden_states' holds NaN"):
        dqcompile.quantize(model, spec, calibration=[samples[0], bad], progress=False)


def test_nan_inside_the_model_names_the_layer():
    model = tiny_dit()
    with torch.no_grad():
        model.transformer_blocks[0].attn1.to_q.bias[0] = float("inf")  # poisons the next layer's input
    spec = QuantSpec.from_preset("w8a8").replace(activations=ActivationSpec(mode="static_tensor"))
    with pytest.raises(ValueError, match=r"input of layer transformer_blocks\.0\.attn1\.to_out\.0"):
        dqcompile.quantize(model, spec, calibration=[dit_inputs(2)], progress=False)


def test_bad_specs_and_models_are_refused_with_names():
    with pytest.raises(ValueError, match=r"weights\.bits=5 is not allowed; allowed values: 4, 6, 8"):
        WeightSpec(bits=5)
    with pytest.raises(ValueError, match=r"activations\.mode='per_row'"):
        ActivationSpec(mode="per_row")
    with pytest.raises(ValueError, match="unknown preset 'w3a3'"):
        dqcompile.quantize(tiny_dit(), "w3a3")
    spec = QuantSpec(weights=WeightSpec(group_size=24))
    with pytest.raises(ValueError, match=r"layer transformer_blocks\.0\.attn1\.to_q: weights\.group_size=24 does not divide its 32"):
        dqcompile.quantize(tiny_dit(), spec, progress=False)

    class NoLinear(nn.Module):
        def forward(self, x):
            return torch.relu(x) * 2

    with pytest.raises(ValueError, match="NoLinear has no linear layer"):
        dqcompile.quantize(NoLinear(), example_inputs=(torch.randn(2, 3),), progress=False)


def test_dtype_change_refused_device_move_allowed(dit_w8a8):
    _, qmodel = dit_w8a8
    with pytest.raises(TypeError, match="keeps the dtype it was quantized in"):
        qmodel.to(torch.float16)
    assert qmodel.to("cpu") is qmodel


def test_save_and_load_round_trip(tmp_path, dit_w8a8):
    _, qmodel = dit_w8a8
    dqcompile.save(qmodel, tmp_path / "q")
    assert {p.name for p in (tmp_path / "q").iterdir()} == {"model.safetensors", "plan.json"}
    loaded = dqcompile.load(tmp_path / "q")
    inputs = dit_inputs(batch=3)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).sample, qmodel(**inputs).sample)


def test_save_and_load_custom_model_needs_an_instance(tmp_path):
    model = hand_dit()
    qmodel = dqcompile.quantize(model, "w4a8", example_inputs=hand_dit_inputs(2), progress=False)
    dqcompile.save(qmodel, tmp_path / "q")
    with pytest.raises(ValueError, match="pass model="):
        dqcompile.load(tmp_path / "q")
    loaded = dqcompile.load(tmp_path / "q", hand_dit(seed=9), example_inputs=hand_dit_inputs(2))
    x, t, y = hand_dit_inputs(batch=2, seed=8)
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), qmodel(x, t, y))


def test_dit_pipeline_end_to_end_with_quantized_transformer():
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(8,), latent_channels=4, norm_num_groups=8, layers_per_block=1, sample_size=8,
    )
    transformer = tiny_dit(num_embeds_ada_norm=1000)  # DiTPipeline's null class is 1000
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)

    def images():
        return pipe(class_labels=[1, 2, 3], num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                    output_type="pt").images

    reference = images()
    pipe.transformer = dqcompile.quantize(transformer, "w8a8", progress=False)
    quantized = images()
    assert quantized.shape == reference.shape == (3, 3, 8, 8)
    assert 0 < (quantized - reference).abs().max() < 0.1


def test_train_and_eval_calls_are_accepted(dit_w8a8):
    _, qmodel = dit_w8a8
    assert qmodel.eval() is qmodel and not qmodel.training
    qmodel.train()
    assert qmodel.training
    qmodel.eval()


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec.from_preset("w8a8"),
        QuantSpec.from_preset("w4a16"),
        QuantSpec.from_preset("qdit-w4a8"),
        QuantSpec.from_preset("qdit-w4a8").replace(weights=WeightSpec(bits=4, group_size=128, clip_search=True,
                                                                      rounding="gptq")),
        QuantSpec.from_preset("ptq4dit-w8a8-dyn"),
        QuantSpec.from_preset("tqdit-w8a8"),
        QuantSpec.from_preset("w8a8").replace(activations=ActivationSpec(mode="static_tensor")),
    ],
    ids=["w8a8", "w4a16", "qdit", "qdit-gptq", "ptq4dit-dyn", "tqdit", "static"],
)
def test_needs_calibration_says_what_quantize_demands(spec):
    """The spec's answer is the one callers act on: it must match the pipeline's refusal exactly."""
    model = tiny_dit()
    if spec.needs_calibration:
        with pytest.raises(ValueError, match="needs calibration data"):
            dqcompile.quantize(model, spec, progress=False)
    else:
        assert dqcompile.quantize(model, spec, progress=False).report.quantized_count == 12
