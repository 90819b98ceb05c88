"""diffusers-native checkpoints: the `dqcompile` quantization backend, from_pretrained of quantized folders,
on-the-fly round to nearest at load, pipelines, offload and placement."""

from __future__ import annotations

import json

import pytest
import torch

import dqcompile
from dqcompile.integrations.diffusers import ATTRIBUTE, DQCompileConfig
from family_models import family
from tiny_models import dit_inputs, tiny_dit


@pytest.fixture(scope="module")
def dit_checkpoint(tmp_path_factory):
    model = tiny_dit()
    qmodel = dqcompile.quantize(model, "w8a8", progress=False)
    folder = dqcompile.integrations.save_pretrained(qmodel, tmp_path_factory.mktemp("ckpt") / "dit-w8a8")
    return model, qmodel, folder


def test_import_registers_the_backend():
    from diffusers.quantizers import auto

    assert "dqcompile" in auto.AUTO_QUANTIZER_MAPPING and "dqcompile" in auto.AUTO_QUANTIZATION_CONFIG_MAPPING
    config = DQCompileConfig("w4a8")
    assert config.quant_method == "dqcompile" and config.quant_method.value == "dqcompile"
    assert config.to_dict() == {"quant_method": "dqcompile", "spec": "w4a8"}
    assert type(auto.DiffusersAutoQuantizer.from_dict({"quant_method": "dqcompile", "spec": "w8a8"})) is type(config)


def test_folder_has_the_diffusers_layout(dit_checkpoint):
    _, _, folder = dit_checkpoint
    config = json.loads((folder / "config.json").read_text())
    assert config["_class_name"] == "DiTTransformer2DModel"
    assert config["quantization_config"]["quant_method"] == "dqcompile"
    assert config["quantization_config"]["spec"] == "w8a8"
    assert (folder / "diffusion_pytorch_model.safetensors").is_file()
    assert dqcompile.load(folder) is not None  # still a dqcompile save


def test_from_pretrained_is_bit_identical_and_moves_only_integer_tensors(dit_checkpoint):
    from diffusers import DiTTransformer2DModel

    _, qmodel, folder = dit_checkpoint
    loaded = DiTTransformer2DModel.from_pretrained(folder)
    assert isinstance(loaded, DiTTransformer2DModel)
    inputs = dit_inputs(3)
    with torch.no_grad():
        expected = qmodel(**inputs).sample
        got = loaded(**inputs).sample
    assert torch.equal(got, expected)
    inner = getattr(loaded, ATTRIBUTE)
    dtypes = {t.dtype for t in loaded.state_dict().values()}
    assert torch.int8 in dtypes
    assert not any(name.endswith("attn1.to_q.weight") for name in loaded.state_dict())  # no float copy kept
    moved = loaded.to("cpu")
    assert moved is loaded and inner.device.type == "cpu"
    with pytest.raises((TypeError, ValueError)):
        loaded.to(torch.float16)


def test_pipeline_with_the_quantized_transformer(dit_checkpoint, tmp_path):
    from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline, DiTPipeline, DiTTransformer2DModel

    _, qmodel, folder = dit_checkpoint
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4, sample_size=8).eval()
    pipe = DiTPipeline(transformer=qmodel, vae=vae, scheduler=DDIMScheduler())
    float_pipe_folder = tmp_path / "pipe"
    pipe.register_modules(transformer=tiny_dit())
    pipe.save_pretrained(float_pipe_folder)
    transformer = DiTTransformer2DModel.from_pretrained(folder)
    loaded = DiffusionPipeline.from_pretrained(float_pipe_folder, transformer=transformer)
    assert loaded.transformer is transformer
    # guidance 1: DiTPipeline's null class is 1000, beyond the tiny model's 10 classes
    images = loaded(class_labels=[1, 2], num_inference_steps=2, guidance_scale=1.0, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images
    reference = DiTPipeline(transformer=qmodel, vae=vae, scheduler=loaded.scheduler)(
        class_labels=[1, 2], num_inference_steps=2, guidance_scale=1.0, output_type="np",
        generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 8, 8, 3) and (images == reference).all()


def test_text_conditioned_family_round_trip(tmp_path):
    from diffusers import PixArtTransformer2DModel

    model, inputs = family("pixart")
    qmodel = dqcompile.quantize(model, "w4a8", example_inputs=inputs(2), progress=False)
    qmodel.save_pretrained(tmp_path / "pixart")
    loaded = PixArtTransformer2DModel.from_pretrained(tmp_path / "pixart")
    batch = inputs(3, seed=7)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).sample, qmodel(**batch).sample)


def test_round_to_nearest_quantizes_at_load_and_calibrated_specs_refuse(tmp_path):
    from diffusers import DiTTransformer2DModel

    model = tiny_dit()
    model.save_pretrained(tmp_path / "float")
    on_the_fly = DiTTransformer2DModel.from_pretrained(tmp_path / "float", quantization_config=DQCompileConfig("w8a8"))
    reference = dqcompile.quantize(model, "w8a8", progress=False)
    inputs = dit_inputs(2)
    with torch.no_grad():
        assert torch.equal(on_the_fly(**inputs).sample, reference(**inputs).sample)
    with pytest.raises(ValueError, match="needs calibration.*save_pretrained"):
        DiTTransformer2DModel.from_pretrained(tmp_path / "float", quantization_config=DQCompileConfig("ptq4dit-w8a8"))


def test_cpu_offload_in_a_pipeline_moves_integer_tensors_without_requantizing(dit_checkpoint):
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline

    _, qmodel, _ = dit_checkpoint
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4, sample_size=8).eval()
    pipe = DiTPipeline(transformer=qmodel, vae=vae, scheduler=DDIMScheduler())
    qweight = qmodel.graph_module.get_buffer("transformer_blocks.0.attn1.to_q.qweight")
    before = qweight.clone()
    expected = pipe(class_labels=[3, 4], num_inference_steps=2, guidance_scale=1.0, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images
    pipe.enable_model_cpu_offload(device="cpu")
    got = pipe(class_labels=[3, 4], num_inference_steps=2, guidance_scale=1.0, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    after = qmodel.graph_module.get_buffer("transformer_blocks.0.attn1.to_q.qweight")
    assert after.dtype == torch.int8 and torch.equal(after, before)
    assert (got == expected).all()
