"""The benchmark Fashion-MNIST DiT: a larger class-conditional DiT for telling quantization methods apart.

The embedded model (dqcompile.fmnist.dit, 4.61M parameters) stays the demo's default. The benchmark
model is the same stock diffusers ``DiTTransformer2DModel`` (patch 2 on 32x32x1: 256 tokens, adaLN-Zero,
GELU MLPs, the same null class), 12 layers x 288 wide (6 heads x 48), trained on DiT-XL/2's linear beta
schedule (1e-4 to 0.02 over 1000 steps) rather than the embedded model's cosine one, like the DiTs that
the quantization methods were published on:
20.06M parameters, 4.36x the embedded model. It is trained with ``examples/train_fmnist_dit.py --arch
benchmark`` (see there for the command) and kept in the repository, not in the wheel, as bf16
safetensors in shards of at most 12 MiB (the device machine returns files of at most 16 MiB) under
``benchmarks/models/fmnist_dit_b/``:

- ``config.json``: {"model": DiT config, "scheduler": training schedule, "null_class_id": 10};
- ``model.safetensors.index.json`` + ``model-0000K-of-0000N.safetensors``: the EMA weights in bf16,
  in the Hugging Face sharded-checkpoint layout (an index whose "weight_map" names each tensor's shard);
- ``training.json``: how it was trained (command, steps, time, loss, device), and later its FID at each
  step count;
- ``reference_output.safetensors``: a forward at batch 2 on fixed inputs (``reference_inputs``), which
  the CI test compares against (tests/test_benchmark_model.py).

The shape is a compromise with the device machine's transfer limits: 12 x 384 (35M parameters) would be
67 MiB in bf16, more than one call may return (64 MiB) or send along with the data and wheels.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import DiTTransformer2DModel
from safetensors.torch import load_file, save_file

from dqcompile.fmnist.dit import (
    FMNIST_DIT_CONFIG,
    FMNIST_SCHEDULER_CONFIG,
    NULL_CLASS_ID,
    NUM_CLASSES,
    build_fmnist_dit,
    load_embedded_config,
    load_embedded_model,
)

__all__ = [
    "BENCHMARK_DIT_CONFIG",
    "BENCHMARK_SCHEDULER_CONFIG",
    "CONFIG_NAME",
    "INDEX_NAME",
    "MAX_SHARD_BYTES",
    "RECORD_NAME",
    "REFERENCE_OUTPUT_NAME",
    "benchmark_config",
    "benchmark_model_dir",
    "benchmark_training_record",
    "load_benchmark_model",
    "load_model_folder",
    "load_sharded",
    "reference_inputs",
    "save_benchmark_model",
    "save_sharded",
    "write_reference_output",
]

BENCHMARK_DIT_CONFIG: dict[str, Any] = {
    **FMNIST_DIT_CONFIG,
    "num_layers": 12,
    "num_attention_heads": 6,
    "attention_head_dim": 48,
}

# DiT's (and diffusers' default) linear betas. Under the cosine schedule's last step (t = 999,
# sqrt(alpha_bar) = 5e-5) an unclipped x0 estimate is ill-conditioned; under linear betas it is 6e-3.
BENCHMARK_SCHEDULER_CONFIG: dict[str, Any] = {
    **FMNIST_SCHEDULER_CONFIG,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "beta_end": 0.02,
}

CONFIG_NAME = "config.json"
INDEX_NAME = "model.safetensors.index.json"
RECORD_NAME = "training.json"
REFERENCE_OUTPUT_NAME = "reference_output.safetensors"
MAX_SHARD_BYTES = 12 * 2**20
# Relative to the repository root: a source checkout has it, an installed wheel does not.
REPOSITORY_FOLDER = Path("benchmarks") / "models" / "fmnist_dit_b"

_TRAINING_HINT = (
    "Train it with `PYTHONPATH=. python examples/train_fmnist_dit.py --arch benchmark --data DIR --out "
    "benchmarks/models/fmnist_dit_b` (DIR holds the four Fashion-MNIST .gz files; benchmarks/gpu_testbed.sh "
    "runs it on a GPU). The benchmark model lives in a source checkout of the repository, not in the wheel."
)


def benchmark_model_dir() -> Path:
    """The repository's benchmarks/models/fmnist_dit_b/ (next to the dqcompile package of a source checkout)."""
    return Path(__file__).resolve().parents[2] / REPOSITORY_FOLDER


def _folder(directory: str | Path | None) -> Path:
    return Path(directory) if directory is not None else benchmark_model_dir()


def _file(directory: str | Path | None, name: str) -> Path:
    path = _folder(directory) / name
    if not path.is_file():
        raise FileNotFoundError(f"benchmark model file {name} not found in {_folder(directory)}. {_TRAINING_HINT}")
    return path


def save_sharded(
    state_dict: dict[str, torch.Tensor], directory: str | Path, *, dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int = MAX_SHARD_BYTES, metadata: dict[str, str] | None = None,
) -> list[Path]:
    """Write floating-point tensors in ``dtype`` as safetensors shards of at most ``max_shard_bytes`` (a
    larger single tensor gets a shard of its own) plus the index; returns the shard paths.

    Shards are filled in the state dict's order; names follow the Hugging Face layout
    (model-00001-of-00003.safetensors) and the index maps every tensor to its shard."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {
        name: (tensor.detach().to(dtype) if tensor.is_floating_point() else tensor.detach()).cpu().contiguous()
        for name, tensor in state_dict.items()
    }
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    for stale in folder.glob("model-*-of-*.safetensors"):
        stale.unlink()
    paths, weight_map = [], {}
    for index, shard in enumerate(shards, start=1):
        path = folder / f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, path, metadata={"format": "pt", **(metadata or {})})
        paths.append(path)
        weight_map.update({name: path.name for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                indent=2) + "\n")
    return paths


def load_sharded(directory: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a sharded checkpoint written by ``save_sharded`` (as stored: bf16)."""
    folder = Path(directory)
    index = json.loads(_file(folder, INDEX_NAME).read_text())
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        state.update(load_file(_file(folder, shard)))
    missing = set(index["weight_map"]) - set(state)
    if missing:
        raise ValueError(f"{folder}: the shards lack {len(missing)} tensors of the index, e.g. {sorted(missing)[0]}")
    return state


def save_benchmark_model(
    model: torch.nn.Module, directory: str | Path, *, model_config: dict[str, Any],
    scheduler_config: dict[str, Any] | None = None, record: dict[str, Any] | None = None,
) -> list[Path]:
    """Write the model's weights (bf16 shards), config.json and, when given, training.json."""
    folder = Path(directory)
    paths = save_sharded(model.state_dict(), folder, metadata={"weights": "ema"})
    config = {"model": model_config, "scheduler": scheduler_config or BENCHMARK_SCHEDULER_CONFIG,
              "null_class_id": NULL_CLASS_ID}
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    if record is not None:
        (folder / RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n")
    return paths


def benchmark_config(directory: str | Path | None = None) -> dict[str, Any]:
    """The folder's config.json: {"model": DiT config, "scheduler": schedule, "null_class_id": 10}."""
    return json.loads(_file(directory, CONFIG_NAME).read_text())


def benchmark_training_record(directory: str | Path | None = None) -> dict[str, Any]:
    return json.loads(_file(directory, RECORD_NAME).read_text())


def load_benchmark_model(
    directory: str | Path | None = None, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
) -> DiTTransformer2DModel:
    """The benchmark DiT (EMA weights) in eval mode, from ``directory`` (default: the repository's
    benchmarks/models/fmnist_dit_b/). The weights are stored in bf16; ``dtype`` float32 holds them exactly.

    Raises FileNotFoundError, with how to train it, when the folder has no checkpoint.
    """
    config = benchmark_config(directory)
    model = build_fmnist_dit(config["model"])
    model.load_state_dict({name: tensor.float() for name, tensor in load_sharded(_folder(directory)).items()},
                          strict=True)
    model = model.to(device)
    if dtype != torch.float32:
        model = model.to(dtype)
    return model.eval()


def load_model_folder(
    directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
) -> tuple[DiTTransformer2DModel, dict[str, Any]]:
    """A Fashion-MNIST DiT from a folder in either layout, and its config ({"model", "scheduler",
    "null_class_id"}): the embedded layout (fmnist_dit.json + fmnist_dit.safetensors, what the training
    script writes for --arch embedded) or the benchmark layout (config.json + bf16 shards)."""
    folder = Path(directory)
    if (folder / CONFIG_NAME).is_file():
        return load_benchmark_model(folder, device=device, dtype=dtype), benchmark_config(folder)
    return load_embedded_model(device=device, dtype=dtype, directory=folder), load_embedded_config(folder)


def reference_inputs(batch: int = 2) -> dict[str, torch.Tensor]:
    """Fixed inputs for the stored-output check: seeded noise images, timesteps 999 and 250, classes
    3 and the null class."""
    generator = torch.Generator().manual_seed(1234)
    hidden_states = torch.randn(batch, 1, 32, 32, generator=generator)
    timestep = torch.tensor([999, 250] * (batch // 2) + [500] * (batch % 2), dtype=torch.long)
    class_labels = torch.tensor([3, NUM_CLASSES] * (batch // 2) + [7] * (batch % 2), dtype=torch.long)
    return {"hidden_states": hidden_states, "timestep": timestep, "class_labels": class_labels}


@torch.no_grad()
def write_reference_output(directory: str | Path | None = None) -> Path:
    """Load the folder's model on CPU in fp32, run ``reference_inputs()``, and store the output
    (fp32) as reference_output.safetensors beside the checkpoint."""
    model = load_benchmark_model(directory)
    output = model(**reference_inputs()).sample.float().contiguous()
    path = _folder(directory) / REFERENCE_OUTPUT_NAME
    save_file({"sample": output}, path, metadata={"format": "pt", "torch": torch.__version__})
    return path
