"""Non-finite inputs: every preset propagates NaN and inf as the float model does, never launders them.

A static quantizer would turn NaN into an ordinary code; the lowering hands the integer product a
scale that is NaN for any row holding NaN or inf (passes/lower.py), and dynamic quantizers take NaN
into their own scales. The quantized model's non-finite outputs must be exactly the float model's.
"""

import pytest
import torch

import dqcompile
from golden import PRESETS, calibration_samples, evaluation_inputs, output_tensor
from tiny_models import tiny_dit


@pytest.fixture(scope="module")
def model():
    return tiny_dit()


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_outputs_are_the_float_models(model, preset, poison):
    qmodel = _quantized(model, preset)
    inputs = evaluation_inputs("dit")
    inputs["hidden_states"][1, 2, 5, 6] = poison  # one pixel of the second sample
    with torch.no_grad():
        expected, actual = output_tensor(model(**inputs)), output_tensor(qmodel(**inputs))
    assert not torch.isfinite(expected[1]).any() and torch.isfinite(expected[[0, 2]]).all()
    assert torch.equal(torch.isfinite(actual), torch.isfinite(expected))


_CACHE: dict[str, dqcompile.QuantizedModel] = {}


def _quantized(model, preset):
    if preset not in _CACHE:
        _CACHE[preset] = dqcompile.quantize(model, preset, calibration=calibration_samples("dit"), progress=False)
    return _CACHE[preset]
