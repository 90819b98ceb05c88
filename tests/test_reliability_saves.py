"""Saves are what they claim: atomic, checked against their tensors, bounded before anything is built.

Each test changes a save in one way (flipped bytes, edited plan fields, swapped or re-typed tensors,
a config asking for a huge model, a foreign source class, an interrupted save) and asserts the exact
refusal. "Forged" saves have their digest and sha256 recomputed, as a careless tool (or a deliberate
editor) would: they pass the integrity checks and must still be refused by the checks of content.
"""

import json
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch

import dqcompile
from dqcompile import api
from tiny_models import dit_inputs, tiny_dit


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    qmodel = dqcompile.quantize(tiny_dit(), "w8a8", progress=False)
    folder = dqcompile.save(qmodel, tmp_path_factory.mktemp("saves") / "q")
    with torch.no_grad():
        expected = qmodel(**dit_inputs(3)).sample
    return folder, expected


@pytest.fixture
def copy(saved, tmp_path):
    folder, _ = saved
    target = tmp_path / "q"
    shutil.copytree(folder, target)
    return target


def read_plan(folder: Path) -> dict:
    return json.loads((folder / "plan.json").read_text())


def forge(folder: Path, plan: dict) -> None:
    """Write plan.json with its sha256 and digest recomputed for the current tensor file."""
    plan["sha256"] = api._sha256(folder / "model.safetensors")
    plan["digest"] = api._plan_digest(plan)
    (folder / "plan.json").write_text(json.dumps(plan))


def rewrite_tensors(folder: Path, change) -> dict:
    tensors = safetensors.torch.load_file(folder / "model.safetensors")
    change(tensors)
    safetensors.torch.save_file(tensors, folder / "model.safetensors")
    plan = read_plan(folder)
    plan["tensors"] = {name: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
                       for name, t in tensors.items()}
    return plan


def test_round_trip_is_bit_identical(saved):
    folder, expected = saved
    with torch.no_grad():
        assert torch.equal(dqcompile.load(folder)(**dit_inputs(3)).sample, expected)


def test_flipped_bytes_in_the_tensor_file_are_refused(copy):
    data = bytearray((copy / "model.safetensors").read_bytes())
    for offset in range(len(data) - 1000, len(data)):
        data[offset] ^= 0x5A
    (copy / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model\.safetensors was changed after it was saved \(its sha256"):
        dqcompile.load(copy)


@pytest.mark.parametrize("edit", [
    lambda p: p["spec"]["activations"].update(bits=6),
    lambda p: p["spec"]["activations"].update(symmetric=True),
    lambda p: p["spec"]["weights"].update(bits=4),
    lambda p: p["spec"].update(method="ptq4dit"),
    lambda p: p["config"].update(num_layers=10**6),
    lambda p: p["plan"]["layers"][3]["activations"].update(bits=16),
], ids=["activation-bits", "symmetric", "weight-bits", "method", "num-layers", "layer-plan"])
def test_edited_plan_fields_are_refused(copy, edit):
    plan = read_plan(copy)
    edit(plan)
    (copy / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(ValueError, match=r"plan\.json was changed after it was saved \(its digest"):
        dqcompile.load(copy)


def test_forged_weight_bits_are_refused_by_the_codes(copy):
    plan = read_plan(copy)
    layer = next(entry for entry in plan["plan"]["layers"] if entry["weight"] is not None)
    layer["weight"]["bits"] = 4
    forge(copy, plan)
    with pytest.raises(ValueError, match=rf"layer {layer['name']}: 4-bit codes must be torch\.uint8"):
        dqcompile.load(copy)


@pytest.mark.parametrize("value", [float("nan"), -1.0])
def test_forged_scales_that_are_not_finite_and_positive_are_refused(copy, value):
    name = "transformer_blocks.0.attn1.to_k.weight_scale"
    plan = rewrite_tensors(copy, lambda tensors: tensors[name].__setitem__((0, 0), value))
    forge(copy, plan)
    with pytest.raises(ValueError, match=r"layer transformer_blocks\.0\.attn1\.to_k: weight_scale must be finite, positive"):
        dqcompile.load(copy)


def test_forged_tensor_dtypes_are_refused_not_cast(copy):
    name = "transformer_blocks.0.attn1.to_k.bias"
    plan = rewrite_tensors(copy, lambda tensors: tensors.__setitem__(name, tensors[name].half()))
    forge(copy, plan)
    with pytest.raises(ValueError, match=rf"tensor {name}: the file holds torch\.float16 \(32,\), the model needs torch\.float32"):
        dqcompile.load(copy)


def test_tensors_not_listed_in_the_plan_are_refused(copy):
    plan = read_plan(copy)
    tensors = safetensors.torch.load_file(copy / "model.safetensors")
    names = list(tensors)
    tensors[names[0]], tensors[names[1]] = tensors[names[1]], tensors[names[0]]  # swapped under their names
    safetensors.torch.save_file(tensors, copy / "model.safetensors")
    with pytest.raises(ValueError, match="its sha256 does not match"):
        dqcompile.load(copy)
    forge(copy, plan)  # hashes made to match: the listed shapes still give the swap away
    if tensors[names[0]].shape != tensors[names[1]].shape:
        with pytest.raises(ValueError, match=r"tensor .*: .* in the file, plan\.json says"):
            dqcompile.load(copy)


def test_a_forged_huge_config_is_refused_before_it_is_built(copy):
    plan = read_plan(copy)
    plan["config"]["num_layers"] = 10**6
    forge(copy, plan)
    with pytest.raises(ValueError, match=r"its model config builds more than .* parameter elements"):
        dqcompile.load(copy)


@pytest.mark.parametrize("source", ["diffusers_evil.DiTTransformer2DModel", "diffusers.models.unets.unet_2d.UNet2DModel",
                                    "os.system", "diffusers.DiTTransformer2DModel"])
def test_only_diffusers_own_transformer_classes_are_rebuilt(copy, source):
    plan = read_plan(copy)
    plan["source_class"] = source
    forge(copy, plan)
    with pytest.raises(ValueError, match=r"load rebuilds only diffusers transformer models from their config"):
        dqcompile.load(copy)


def test_a_save_that_fails_midway_leaves_the_earlier_save_whole(saved, copy, monkeypatch):
    _, expected = saved
    qmodel = dqcompile.load(copy)
    real_save = safetensors.torch.save_file

    def interrupted(tensors, path, *args, **kwargs):
        real_save(dict(list(tensors.items())[:3]), path)
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        dqcompile.save(qmodel, copy)
    monkeypatch.undo()
    assert sorted(path.name for path in copy.parent.iterdir()) == ["q"]  # no staging folder left behind
    with torch.no_grad():
        assert torch.equal(dqcompile.load(copy)(**dit_inputs(3)).sample, expected)


def test_missing_files_and_old_formats_say_what_is_wrong(copy, tmp_path):
    with pytest.raises(ValueError, match=r"is not a dqcompile save: plan\.json is missing"):
        dqcompile.load(tmp_path / "nothing")
    plan = read_plan(copy)
    plan["format_version"] = 1
    (copy / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(ValueError, match=r"format_version 1 is not 2 \(save it again with this version\)"):
        dqcompile.load(copy)
    (copy / "plan.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"plan\.json: not valid JSON"):
        dqcompile.load(copy)
