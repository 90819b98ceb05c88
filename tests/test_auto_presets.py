"""The recommended presets (dqcompile/methods/auto): registered, valid, on the kernels' fast path, and each
candidate a spec the driver's row set names."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import dqcompile
from dqcompile import QuantSpec
from dqcompile.methods.auto import CANDIDATES, PIECES, RECOMMENDED
from tiny_models import dit_inputs, rel_l2, tiny_dit

WIDTHS = {"w8a8": (8, 8), "w4a8": (4, 8), "w6a6": (6, 6)}


def test_every_width_has_a_recommended_preset_and_candidates():
    presets = set(dqcompile.presets())
    for width, (w_bits, a_bits) in WIDTHS.items():
        name = f"auto-{width}"
        assert name in presets
        spec = QuantSpec.from_preset(name)
        assert spec == CANDIDATES[RECOMMENDED[name]].replace(name=name)
        candidates = [c for c in CANDIDATES if c.startswith(name + "-")]
        assert len(candidates) >= 3, width
        for candidate in candidates:
            spec = QuantSpec.from_preset(candidate)
            assert set(candidate.removeprefix(name + "-").split("-")) <= set(PIECES), candidate
            assert (spec.weights.bits, spec.activations.bits) == (w_bits, a_bits)
            # The fast path: dynamic activations per token (and group where the name says "ag"); per-channel
            # weights unless the name says groups.
            pieces = candidate.split("-")
            grouped_activations = any(piece.startswith("ag") for piece in pieces)
            assert spec.activations.mode == ("dynamic_group" if grouped_activations else "dynamic_token"), candidate
            group = next((int(piece.removeprefix("ag").removeprefix("g")) for piece in pieces
                          if piece.startswith(("g", "ag")) and piece.lstrip("ag").isdigit()), 0)
            assert spec.weights.group_size == group, candidate
            assert spec.fit_group_sizes == bool(group), candidate
            assert ("gptq" in candidate) == (spec.weights.rounding == "gptq"), candidate
            recon = spec.method == "ptq4dit" and spec.options.reconstruction.enabled
            assert ("recon" in candidate) == recon, candidate
            assert ("csb" in candidate) == (spec.method == "ptq4dit" and spec.options.balance), candidate
            assert QuantSpec.from_dict(spec.to_dict()) == spec
            assert spec.needs_calibration  # GPTQ, reconstruction and balancing all calibrate


def test_each_pick_is_documented_with_its_evidence():
    """Each recommended name and the candidate it points at appear in the doc of the GPU tables that picked
    it, which the module's docstring names."""
    import dqcompile.methods.auto as auto

    assert "docs/methods_quality.md" in auto.__doc__
    doc = (Path(__file__).resolve().parents[1] / "docs" / "methods_quality.md").read_text()
    for name, source in RECOMMENDED.items():
        assert f"`{name}`" in doc and f"`{source}`" in doc, (name, source)


def test_the_driver_row_set_evaluates_every_candidate_against_the_baselines():
    benchmarks = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(benchmarks))
    spec = importlib.util.spec_from_file_location("evaluate_auto", benchmarks / "evaluate.py")
    driver = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = driver
    spec.loader.exec_module(driver)
    rows = driver.select_rows(["auto"], [])
    specs = {row.spec for row in rows}
    assert set(CANDIDATES) <= specs and {"fp", "w8a8", "w4a8", "w6a6", "torchao-int8dyn"} <= specs
    assert [row.label for row in rows if row.label.endswith("(auto)")] == [f"{RECOMMENDED[f'auto-{w}']} (auto)"
                                                                          for w in WIDTHS]
    for row in rows:
        driver.parse_spec(row.spec)


@pytest.mark.parametrize("name", ["auto-w8a8", "auto-w6a6"])
def test_a_recommended_preset_quantizes(name):
    model = tiny_dit()
    calibration = [dit_inputs(batch=2, seed=seed) for seed in range(3)]
    qmodel = dqcompile.quantize(model, name, calibration=calibration, progress=False)
    inputs = dit_inputs(batch=3, seed=9)
    with torch.no_grad():
        assert rel_l2(qmodel(**inputs).sample, model(**inputs).sample) < 0.05
    assert qmodel.report.quantized_count == 12
