"""The embedded default model: a small class-conditional DiT trained on Fashion-MNIST (32x32, 1 channel).

It is a stock diffusers ``DiTTransformer2DModel``, so everything that quantizes it quantizes the same
module structure as DiT-XL/2: patch size 2 on a 32x32 input gives 256 tokens (DiT-XL/2's token count at
256 px), adaLN-Zero blocks, GELU MLPs. Width 192 (6 heads x 32), 6 layers: about 4.6M parameters,
18.4 MB in fp32, and on 2 CPU cores about one second per forward of 64 rows, so that CPU sampling of 32
images x 20 DDIM steps with guidance takes about 22 s.

Class conditioning: labels 0..9 are the Fashion-MNIST classes (dqcompile.fmnist.data.CLASS_NAMES); label
``NULL_CLASS_ID`` = 10 is the "no class" row used by classifier-free guidance (diffusers gives the label
table ``num_classes + 1`` rows when its class dropout is on, and the last row is the null class).

The noise schedule is diffusers' ``squaredcos_cap_v2`` (the cosine schedule of Nichol & Dhariwal 2021),
epsilon prediction. Why cosine rather than DDPM's linear betas for 32x32 pixel space: the linear schedule
destroys a small image's information early, so its last part is nearly pure noise, which wastes training
steps and makes few-step DDIM sampling (20-50 steps, what the quantization evaluation runs) lose more; the
cosine schedule spreads the signal-to-noise ratio evenly in log space over all timesteps.
The default sampler settings are leading timestep spacing without clipping x0 (FMNIST_SCHEDULER_CONFIG
says why, with the measured float FIDs).

The sampler settings (``clip_sample``, ``timestep_spacing``, DDIM or DDPM, steps) are a protocol choice of
whoever samples, not a property of the model: ``make_scheduler`` takes them as arguments, and the values in
the checkpoint's config are only the defaults used when none are given (docs/quality.md, "Sampler
settings", says which protocol the tables use and why).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from diffusers import DiTTransformer2DModel
from safetensors.torch import load_file

from dqcompile.sampling import make_scheduler as make_schedule_scheduler

if TYPE_CHECKING:
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

__all__ = [
    "FMNIST_DIT_CONFIG",
    "FMNIST_SCHEDULER_CONFIG",
    "NUM_CLASSES",
    "NULL_CLASS_ID",
    "CHECKPOINT_NAME",
    "CHECKPOINT_DIR",
    "CONFIG_NAME",
    "TRAINING_RECORD_NAME",
    "build_fmnist_dit",
    "data_file",
    "load_embedded_model",
    "load_embedded_config",
    "embedded_training_record",
    "make_scheduler",
]

NUM_CLASSES = 10
NULL_CLASS_ID = NUM_CLASSES

FMNIST_DIT_CONFIG: dict[str, Any] = {
    "num_attention_heads": 6,
    "attention_head_dim": 32,
    "in_channels": 1,
    "out_channels": 1,  # epsilon only: the schedule's variances are fixed, not learned
    "num_layers": 6,
    "dropout": 0.0,
    "attention_bias": True,
    "sample_size": 32,
    "patch_size": 2,
    "activation_fn": "gelu-approximate",
    "num_embeds_ada_norm": NUM_CLASSES,  # diffusers adds the null-class row: label table of 11
    "upcast_attention": False,
    "norm_type": "ada_norm_zero",
    "norm_elementwise_affine": False,
    "norm_eps": 1e-5,
}

# Keys common to DDPMScheduler and DDIMScheduler, so that one dict configures either without warnings.
FMNIST_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "epsilon",
    # The sampling protocol of docs/quality.md. Clipping the predicted x0 to [-1, 1] at every step
    # (diffusers' default) made the float FID rise with the step count (H200, 2,000 samples, DDIM trailing:
    # 3.15 / 10.6 / 19.3 at 20 / 50 / 100 steps); without it, trailing spacing starts this cosine-
    # schedule model at t = 999, where it collapses (FID 67.5 at DDIM 20). Leading spacing without clipping
    # gives a non-increasing FID: 1.57 / 1.27 / 1.32 / 1.23 at DDIM 20 / 50 / 100 and DDPM 250.
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "timestep_spacing": "leading",
}

# The shipped checkpoint files' folder inside the package (dqcompile/fmnist/checkpoints/).
CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_NAME = "fmnist_dit.safetensors"
CONFIG_NAME = "fmnist_dit.json"
TRAINING_RECORD_NAME = "fmnist_dit_training.json"

_TRAINING_HINT = (
    "Train it with `PYTHONPATH=. python examples/train_fmnist_dit.py --data DIR --out OUT` (DIR holds the "
    "four Fashion-MNIST .gz files) and copy OUT/fmnist_dit.safetensors, OUT/fmnist_dit.json and "
    "OUT/fmnist_dit_training.json into dqcompile/fmnist/checkpoints/."
)


def build_fmnist_dit(config: dict[str, Any] | None = None) -> DiTTransformer2DModel:
    """A randomly initialised DiT with the embedded model's architecture (diffusers' default init)."""
    return DiTTransformer2DModel(**(config or FMNIST_DIT_CONFIG))


def data_file(name: str, directory: str | Path | None, how_to_make: str) -> Path:
    """Path of a model file: in ``directory`` if given, else in the package's data folder.

    Raises FileNotFoundError naming the file, where it was looked for, and ``how_to_make`` it.
    """
    if directory is not None:
        path = Path(directory) / name
    else:
        # The package data is a plain folder in any install that can import torch extensions,
        # so the Traversable is a real file.
        path = Path(str(resources.files("dqcompile.fmnist").joinpath(CHECKPOINT_DIR, name)))
    if not path.is_file():
        where = f"in {directory}" if directory is not None else "in dqcompile/fmnist/checkpoints/ (not shipped yet?)"
        raise FileNotFoundError(f"model file {name} not found {where}. {how_to_make}")
    return path


def load_embedded_config(directory: str | Path | None = None) -> dict[str, Any]:
    """The checkpoint's config json: {"model": DiT config, "scheduler": scheduler config, ...}."""
    return json.loads(data_file(CONFIG_NAME, directory, _TRAINING_HINT).read_text())


def load_embedded_model(
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    directory: str | Path | None = None,
) -> DiTTransformer2DModel:
    """The trained Fashion-MNIST DiT (EMA weights), in eval mode.

    Args:
        device, dtype: where and in which dtype to put the weights (stored in fp32).
        directory: a folder holding fmnist_dit.safetensors and fmnist_dit.json (the training script's
            output); default: the files shipped in dqcompile/fmnist/checkpoints/.

    Raises:
        FileNotFoundError: when the checkpoint is not there, with how to train it.
    """
    config = load_embedded_config(directory)
    state_dict = load_file(data_file(CHECKPOINT_NAME, directory, _TRAINING_HINT))
    model = build_fmnist_dit(config["model"])
    model.load_state_dict(state_dict, strict=True)
    model = model.to(device)
    if dtype != torch.float32:  # diffusers warns on every dtype cast, so cast only when asked to
        model = model.to(dtype)
    return model.eval()


def embedded_training_record(directory: str | Path | None = None) -> dict[str, Any]:
    """How the checkpoint was trained: command, steps, batch size, device, torch version, wall time, loss."""
    return json.loads(data_file(TRAINING_RECORD_NAME, directory, _TRAINING_HINT).read_text())


def make_scheduler(
    kind: Literal["ddim", "ddpm"] = "ddim",
    config: dict[str, Any] | None = None,
    *,
    clip_sample: bool | None = None,
    timestep_spacing: str | None = None,
) -> SchedulerMixin:
    """A fresh diffusers scheduler for the embedded model's noise schedule.

    Args:
        kind: "ddim" (deterministic, eta 0) or "ddpm" (ancestral sampling).
        config: a scheduler config; default: the shipped checkpoint's, or FMNIST_SCHEDULER_CONFIG when
            no checkpoint is shipped (the two are the same unless someone retrained with another schedule).
        clip_sample: clip the predicted x0 to [-1, 1] at every step (diffusers' DDIM/DDPM option);
            None: the config's value (True in the shipped config).
        timestep_spacing: "trailing", "leading" or "linspace" (diffusers); None: the config's ("leading").
    """
    if config is None:
        try:
            config = load_embedded_config()["scheduler"]
        except FileNotFoundError:
            config = FMNIST_SCHEDULER_CONFIG
    return make_schedule_scheduler(kind, config, clip_sample=clip_sample, timestep_spacing=timestep_spacing)
