"""Every preset on the four tiny model families gives the outputs recorded before the redesign, bit for bit.

The recorded outputs (tests/data/golden_outputs.safetensors) were written by `python tests/golden.py`
at commit 130afe6, the last commit before the one-way compiler redesign.
"""

import pytest
import safetensors.torch
import torch

from golden import GOLDEN_FILE, MODELS, PRESETS, case_output

GOLDEN = safetensors.torch.load_file(GOLDEN_FILE)


@pytest.mark.slow
@pytest.mark.parametrize("family", list(MODELS))
@pytest.mark.parametrize("preset", PRESETS)
def test_preset_output_is_bit_identical_to_the_recorded_one(family, preset):
    expected = GOLDEN[f"{family}/{preset}"]
    actual = case_output(family, preset)
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert torch.equal(actual, expected), float((actual - expected).abs().max())
