"""benchmarks/evaluate.py, the one quality driver: row parsing, row sets, the noise band's tie rule, and a
tiny end-to-end run on a small checkpoint in the benchmark layout (CPU, seconds)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from dqcompile.fmnist import data
from dqcompile.fmnist.benchmark import save_benchmark_model
from dqcompile.fmnist.dit import FMNIST_DIT_CONFIG, build_fmnist_dit

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
TINY_CONFIG = {**FMNIST_DIT_CONFIG, "num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 16}


def load_driver() -> ModuleType:
    sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("evaluate_driver", BENCHMARKS / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


driver = load_driver()


def test_rows_from_the_command_line() -> None:
    labelled = driver.parse_row("w4a8-static=w4a8:activations.mode=static_tensor@steps=3,clip_sample=false")
    assert (labelled.label, labelled.spec) == ("w4a8-static", "w4a8:activations.mode=static_tensor")
    assert dict(labelled.sampler) == {"steps": 3, "clip_sample": False}
    bare = driver.parse_row("qdit-w4a8:weights.rounding=gptq")
    assert bare.label == bare.spec == "qdit-w4a8:weights.rounding=gptq" and bare.sampler == ()
    assert dict(driver.parse_row("fp@scheduler=ddpm,steps=250").sampler) == {"scheduler": "ddpm", "steps": 250}
    with pytest.raises(ValueError, match="unknown sampler setting"):
        driver.parse_row("fp@stepz=3")


def test_specs_with_overrides() -> None:
    assert driver.parse_spec("fp") is None
    spec = driver.parse_spec("w4a8:activations.mode=static_tensor")
    assert spec.weights.bits == 4 and spec.activations.mode == "static_tensor" and spec.needs_calibration
    schedule = {"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 1000}
    tqdit = driver.parse_spec("tqdit-w8a8:options.time_groups=1", schedule)
    assert tqdit.options.beta_schedule == "squaredcos_cap_v2" and tqdit.options.time_groups == 1
    assert driver.parse_spec("ptq4dit-w4a8:options.ssc=false").options.ssc is False
    assert driver.parse_spec("qdit-w4a8:weights.rounding=gptq").weights.rounding == "gptq"
    with pytest.raises(ValueError, match="no field 'activation'"):
        driver.parse_spec("w8a8:activation.mode=static_tensor")
    with pytest.raises(ValueError, match="unknown preset"):
        driver.parse_spec("w3a3")


def test_every_row_set_parses_and_labels_are_unique() -> None:
    for name, (_, rows) in driver.ROW_SETS.items():
        for row in driver.select_rows([name], []):
            driver.parse_spec(row.spec)
        assert len({row.label for row in rows}) == len(rows), name
    steps = driver.select_rows(["steps"], [])
    cells = {(dict(r.sampler)["scheduler"], dict(r.sampler)["steps"], dict(r.sampler)["clip_sample"]) for r in steps}
    assert cells == {(s, n, clip) for s, n in driver.STEP_CELLS for clip in (True, False)}
    with pytest.raises(ValueError, match="unknown row set"):
        driver.select_rows(["nope"], [])
    with pytest.raises(ValueError, match="repeated"):
        driver.select_rows(["float", "noise"], [])


def test_noise_band_and_tie_rule() -> None:
    band = driver.summarize([10.0, 10.4, 10.2])
    assert band["mean"] == pytest.approx(10.2) and band["range"] == pytest.approx(0.4)
    assert band["std"] == pytest.approx(0.2)
    assert "std" not in driver.summarize([3.0])
    baseline = {"fid": driver.summarize([10.0, 10.4, 10.2]), "psnr_db_vs_fp": driver.summarize([30.0, 30.1, 30.2])}
    assert driver.compare({"fid": driver.summarize([10.5, 10.6, 10.55])}, baseline, "fid") == "tie"  # 0.35 <= 0.4
    assert driver.compare({"fid": driver.summarize([11.0, 11.1, 11.05])}, baseline, "fid") == "worse"
    assert driver.compare({"fid": driver.summarize([9.0, 9.1, 9.05])}, baseline, "fid") == "better"
    assert driver.compare({"psnr_db_vs_fp": driver.summarize([31.0, 31.1, 31.2])}, baseline, "psnr_db_vs_fp") == "better"
    assert driver.compare({"fid": driver.summarize([9.0])}, baseline, "fid") == ""  # one seed: no band, no verdict


@pytest.mark.slow
@pytest.mark.skipif(data.find_fashion_mnist("test") is None, reason="Fashion-MNIST files not installed")
def test_tiny_run_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three rows run; a row that fails is recorded with its error, the rows after it still run, and the
    driver exits non-zero naming it."""
    torch.manual_seed(0)
    model = build_fmnist_dit(TINY_CONFIG).eval()
    save_benchmark_model(model, tmp_path / "tiny", model_config=TINY_CONFIG)
    out = tmp_path / "result.json"
    run_row = driver.Evaluation.run_row

    def failing_run_row(self, row):
        if row.label == "broken":
            raise RuntimeError("kernel launch failed")
        return run_row(self, row)

    monkeypatch.setattr(driver.Evaluation, "run_row", failing_run_row)
    with pytest.raises(SystemExit, match=r"1 row\(s\) failed: broken"):
        driver.main(["--model", str(tmp_path / "tiny"), "--rows", "float", "--row", "w8a8=w8a8@steps=2",
                     "--row", "broken=w8a8", "--row", "clipped=fp@clip_sample=true", "--samples", "6", "--steps",
                     "1", "--seeds", "0,1", "--reference-size", "50", "--metrics", "fid,accuracy,psnr", "--device",
                     "cpu", "--out", str(out)])
    result = json.loads(out.read_text())
    broken = result["rows"].pop(2)
    assert broken["label"] == "broken" and broken["error"] == "RuntimeError: kernel launch failed"
    assert "Failed: broken (RuntimeError: kernel launch failed)" in out.with_suffix(".md").read_text()
    assert {"device", "date", "commit", "torch"} <= set(result) and result["protocol"]["seeds"] == [0, 1]
    assert result["protocol"]["sampler"] == {"scheduler": "ddim", "steps": 1, "clip_sample": False,
                                             "timestep_spacing": "leading", "guidance": 1.5}
    fp, w8a8, clipped = result["rows"]
    assert [entry["seed"] for entry in fp["seeds"]] == [0, 1]
    assert {"fid", "accuracy", "images_per_second"} <= set(fp["stats"]) and "std" in fp["stats"]["fid"]
    assert "psnr_db_vs_fp" in w8a8["stats"] and w8a8["sampler_settings"]["steps"] == 2
    assert w8a8["quantize_seconds"] > 0 and clipped["sampler_settings"]["clip_sample"] is True
    table = out.with_suffix(".md").read_text()
    assert "| w8a8 | DDIM 2, clip off" in table and "| clipped | DDIM 1, clip on" in table
