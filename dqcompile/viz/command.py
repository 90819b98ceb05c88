"""`dqcompile viz`: quantize a model, measure each layer's error on its own sampling trajectories, draw the graph.

The model and its noise schedule are arguments (the command line passes the embedded Fashion-MNIST DiT)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import torch
from torch import nn

import dqcompile
from dqcompile.capture import capture
from dqcompile.sampling import make_scheduler, sample
from dqcompile.methods.ptq4dit import find_adaln_pairs
from dqcompile.viz.browser import page_url, screenshot
from dqcompile.viz.errors import ErrorMode, format_layer_errors, layer_errors
from dqcompile.viz.render import RenderedFiles, render

if TYPE_CHECKING:
    from diffusers.schedulers.scheduling_utils import SchedulerMixin


class _RecordInputs(nn.Module):
    """Calls the model and keeps the keyword inputs of every call (the sampler's x_t, t and labels)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = getattr(model, "config", None)
        self.calls: list[dict[str, torch.Tensor]] = []

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor) -> Any:
        self.calls.append({"hidden_states": hidden_states.clone(), "timestep": timestep.clone(),
                           "class_labels": class_labels.clone()})
        output = self.model(hidden_states, timestep=timestep, class_labels=class_labels).sample
        # A model that also predicts the variance (DiT-XL/2: 8 channels for 4) puts epsilon first.
        return SimpleNamespace(sample=output[:, : hidden_states.shape[1]])


def trajectory_inputs(model: nn.Module, images: int, steps: int, *, seed: int = 0, progress: bool = True,
                      scheduler: SchedulerMixin | None = None) -> list[dict[str, torch.Tensor]]:
    """The inputs of a class-conditional diffusers DiT at every step of its own DDIM sampling of `images`
    images (classes 0, 1, ... in turn; classifier-free guidance 1.5, so each batch holds 2 x images
    rows: conditional and null class).

    scheduler: the model's noise schedule (a diffusers scheduler); default: diffusers' DDIM with its
    default 1000-step linear-beta schedule.

    These are the activations a quantized model meets in use, which random noise at a random
    timestep is not (a late step's x_t is nearly an image).
    """
    recorder = _RecordInputs(model)
    num_classes = model.config.num_embeds_ada_norm  # diffusers DiT: the null class is the next label
    labels = torch.arange(images) % num_classes
    sample(recorder, labels, scheduler=scheduler if scheduler is not None else make_scheduler("ddim"),
           null_class_id=num_classes, steps=steps, guidance_scale=1.5, seed=seed, batch_size=images,
           progress=progress)
    return recorder.calls


def run_viz(
    model: nn.Module,
    *,
    scheduler: SchedulerMixin | None = None,
    spec: str = "w4a8",
    out: str | Path = "graph.html",
    images: int = 8,
    steps: int = 10,
    csv_path: str | Path | None = None,
    mode: ErrorMode = "isolated",
    device: str = "cpu",
    seed: int = 0,
    screenshot_path: str | Path | None = None,
    progress: bool = True,
) -> RenderedFiles:
    """Quantize the float `model` (a class-conditional diffusers DiT) with `spec`, measure every
    quantized layer's SQNR on the inputs of `steps` sampling steps of `images` images (also the
    calibration data), and write the graph page `out` (+ .dot, + .svg with Graphviz), the error table
    on stdout, and as CSV to `csv_path` when given. images 0 draws the graph without errors.
    screenshot_path: also a PNG of the page (headless Chromium), opened on the worst layer.
    scheduler: the model's noise schedule for the trajectories (see `trajectory_inputs`).
    device: where the model is moved before anything runs.
    """
    if csv_path is not None and images <= 0:
        raise ValueError("the error table needs inputs: csv_path with images > 0")
    model = model.to(device)
    inputs = (trajectory_inputs(model, images, steps, seed=seed, progress=progress, scheduler=scheduler)
              if images > 0 else None)
    qmodel = dqcompile.quantize(model, spec, calibration=inputs, progress=progress)
    captured = capture(model, inputs[0]) if inputs else None
    pairs = find_adaln_pairs(captured if captured is not None else model)
    errors = layer_errors(captured, qmodel, inputs, mode=mode, progress=progress) if inputs else None
    files = render(qmodel, out, errors=errors, pairs=pairs)
    if errors is not None:
        print(format_layer_errors(errors), end="")
        if csv_path is not None:
            Path(csv_path).write_text(format_layer_errors(errors, "csv"))
            print(f"wrote {csv_path}")
    print(files.message)
    if screenshot_path is not None:
        worst = min(errors, key=lambda error: error.sqnr_db) if errors else None
        fragment = "search=" + quote(worst.name) if worst is not None else ""
        print(f"wrote {screenshot(page_url(files.html, fragment), screenshot_path)}")
    return files
