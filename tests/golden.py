"""Golden outputs: every preset on the four tiny model families, recorded once by an earlier version.

`python tests/golden.py` writes tests/data/golden_outputs.safetensors; test_golden.py checks that
today's code gives the same outputs bit for bit. The file was written at commit 130afe6, before the
one-way compiler redesign, so the test proves the redesign changed no preset's numerics.

Each case quantizes one model with one preset (calibration from `calibration_samples`, which every
preset receives, used or not) and runs one batch of 3 (not the capture batch) whose rows sit at
different timesteps.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import hand_dit, tiny_dit, tiny_pixart, tiny_sd3  # noqa: E402

GOLDEN_FILE = Path(__file__).parent / "data" / "golden_outputs.safetensors"
CALIBRATION_TIMESTEPS = (950, 700, 400, 120, 10)
EVALUATION_TIMESTEPS = (999, 512, 37)


def _dit_inputs(batch: int, generator: torch.Generator, timesteps: torch.Tensor) -> dict[str, Any]:
    return {
        "hidden_states": torch.randn(batch, 4, 8, 8, generator=generator),
        "timestep": timesteps,
        "class_labels": torch.randint(0, 10, (batch,), generator=generator),
    }


def _pixart_inputs(batch: int, generator: torch.Generator, timesteps: torch.Tensor) -> dict[str, Any]:
    return {
        "hidden_states": torch.randn(batch, 4, 8, 8, generator=generator),
        "encoder_hidden_states": torch.randn(batch, 8, 24, generator=generator),
        "timestep": timesteps,
        "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
    }


def _sd3_inputs(batch: int, generator: torch.Generator, timesteps: torch.Tensor) -> dict[str, Any]:
    return {
        "hidden_states": torch.randn(batch, 4, 8, 8, generator=generator),
        "encoder_hidden_states": torch.randn(batch, 8, 24, generator=generator),
        "pooled_projections": torch.randn(batch, 16, generator=generator),
        "timestep": timesteps,
    }


def _hand_inputs(batch: int, generator: torch.Generator, timesteps: torch.Tensor) -> dict[str, Any]:
    return {
        "x": torch.randn(batch, 4, 8, 8, generator=generator),
        "t": timesteps,
        "y": torch.randint(0, 10, (batch,), generator=generator),
    }


MakeInputs = Callable[[int, torch.Generator, torch.Tensor], dict[str, Any]]
MODELS: dict[str, tuple[Callable[[], torch.nn.Module], MakeInputs]] = {
    "dit": (tiny_dit, _dit_inputs),
    "pixart": (tiny_pixart, _pixart_inputs),
    "sd3": (tiny_sd3, _sd3_inputs),
    "hand": (hand_dit, _hand_inputs),
}

# Every preset of the redesign's starting point (commit 130afe6).
PRESETS = (
    "w8a8", "w6a6", "w4a8", "w8a16", "w4a16", "qdit-w4a8", "qdit-w6a8", "ptq4dit-w8a8", "ptq4dit-w4a8",
    "ptq4dit-w8a8-dyn", "ptq4dit-w4a8-dyn", "tqdit-w8a8", "tqdit-w6a6", "tqdit-w4a8",
)


def calibration_samples(family: str) -> list[dict[str, Any]]:
    """One batch of 2 per calibration timestep, as a calibration set from sampling trajectories holds."""
    make = MODELS[family][1]
    generator = torch.Generator().manual_seed(7)
    return [make(2, generator, torch.full((2,), t)) for t in CALIBRATION_TIMESTEPS]


def evaluation_inputs(family: str) -> dict[str, Any]:
    make = MODELS[family][1]
    return make(3, torch.Generator().manual_seed(11), torch.tensor(EVALUATION_TIMESTEPS))


def output_tensor(output: Any) -> torch.Tensor:
    if hasattr(output, "sample"):
        return output.sample
    return output[0] if isinstance(output, tuple) else output


def case_output(family: str, preset: str) -> torch.Tensor:
    """The quantized model's output on the evaluation batch."""
    import dqcompile

    model = MODELS[family][0]()
    qmodel = dqcompile.quantize(model, preset, calibration=calibration_samples(family), progress=False)
    with torch.no_grad():
        return output_tensor(qmodel(**evaluation_inputs(family))).contiguous()


def main() -> None:
    import safetensors.torch

    outputs = {}
    for family in MODELS:
        for preset in PRESETS:
            outputs[f"{family}/{preset}"] = case_output(family, preset)
            print(family, preset, tuple(outputs[f"{family}/{preset}"].shape), flush=True)
    GOLDEN_FILE.parent.mkdir(exist_ok=True)
    safetensors.torch.save_file(outputs, GOLDEN_FILE)


if __name__ == "__main__":
    main()
