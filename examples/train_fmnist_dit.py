#!/usr/bin/env python
"""Train a class-conditional DiT on Fashion-MNIST (32x32, 1 channel): the embedded model or the benchmark model.

GPU, the embedded default model (the shipped checkpoint; about 5 minutes of training on one H100):

    PYTHONPATH=. python examples/train_fmnist_dit.py --data .data/fashion-mnist --out $OUT/fmnist --minutes 7

GPU, the benchmark model (12 layers x 288, 20M parameters; benchmarks/gpu_testbed.sh runs this), resumable:
each call trains for --minutes under one learning-rate schedule over --total-minutes, and saves its
state (weights, EMA, optimizer, step, RNG, time spent) in --state, from which the next call resumes:

    PYTHONPATH=. python examples/train_fmnist_dit.py --arch benchmark --data .data/fashion-mnist \
        --out benchmarks/models/fmnist_dit_b --state runs/fmnist_dit_b --minutes 5 --total-minutes 5 --compile

CPU smoke run (seconds):

    PYTHONPATH=. python examples/train_fmnist_dit.py --data /usr/share/datasets/fashion-mnist --out /tmp/fm \
        --device cpu --minutes 0.05 --batch-size 8 --grid-steps 2 --grid-per-class 1

Writes into --out the EMA weights with the model's config and the training record, and a sample grid
(10 classes x --grid-per-class, DDIM --grid-steps steps, guidance --guidance, clip_sample --grid-clip-sample):
--arch embedded: fmnist_dit.safetensors (fp32), fmnist_dit.json, fmnist_dit_training.json,
fmnist_dit_samples.png (the package's layout, dqcompile/fmnist/checkpoints/); --arch benchmark: bf16
shards + model.safetensors.index.json, config.json, training.json, reference_output.safetensors (the CI
check's stored forward) and samples.png (dqcompile.fmnist.benchmark's layout). Training runs for a
wall-clock budget rather than a step count, so that it fits a fixed GPU slot; the learning rate decays
over the total budget. Every call rewrites the outputs, so a run cut short still leaves a checkpoint.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import diffusers
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, DiTTransformer2DModel
from safetensors.torch import save_file
from torch import nn

from dqcompile.fmnist.benchmark import (
    BENCHMARK_DIT_CONFIG,
    BENCHMARK_SCHEDULER_CONFIG,
    RECORD_NAME,
    load_benchmark_model,
    save_benchmark_model,
    write_reference_output,
)
from dqcompile.fmnist.classifier import load_classifier
from dqcompile.fmnist.data import from_model_space, load_fashion_mnist, to_model_space
from dqcompile.fmnist.dit import (
    CHECKPOINT_NAME,
    CONFIG_NAME,
    FMNIST_DIT_CONFIG,
    FMNIST_SCHEDULER_CONFIG,
    NULL_CLASS_ID,
    NUM_CLASSES,
    TRAINING_RECORD_NAME,
    build_fmnist_dit,
    load_embedded_model,
)
from dqcompile.fmnist.grid import save_image_grid
from dqcompile.fmnist.sampling import sample

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the examples' shared helpers, wherever run from
from training_common import device_name, learning_rate, random_horizontal_flip, run_script, train_for  # noqa: E402

GRID_NAME = "fmnist_dit_samples.png"
BENCHMARK_GRID_NAME = "samples.png"
ARCHS = {"embedded": FMNIST_DIT_CONFIG, "benchmark": BENCHMARK_DIT_CONFIG}
SCHEDULES = {"embedded": FMNIST_SCHEDULER_CONFIG, "benchmark": BENCHMARK_SCHEDULER_CONFIG}
STATE_NAME = "train_state.pt"
# Settings a resumed run must share with the run it resumes (the per-call --minutes may change).
RESUME_KEYS = ("arch", "config_override", "beta_schedule", "batch_size", "lr", "warmup_steps", "ema_decay", "class_dropout", "seed",
               "total_minutes")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="folder with the four Fashion-MNIST .gz files")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--arch", choices=tuple(ARCHS), default="embedded",
                        help="embedded (6 x 192, the shipped default model) or benchmark (12 x 288)")
    parser.add_argument("--config-override", default=None,
                        help="JSON object of DiT config keys laid over the arch's (e.g. a tiny model for tests)")
    parser.add_argument("--beta-schedule", choices=("linear", "squaredcos_cap_v2"), default=None,
                        help="training noise schedule (default: the arch's: cosine for embedded, linear for benchmark)")
    parser.add_argument("--minutes", type=float, default=7.0, help="wall-clock training budget of this call")
    parser.add_argument("--total-minutes", type=float, default=None,
                        help="the whole run's budget over all calls (the learning-rate schedule's); default --minutes")
    parser.add_argument("--state", default=None,
                        help="folder of the resumable training state: resumed from when it holds one, written at "
                             "the end of the call and every --checkpoint-minutes")
    parser.add_argument("--checkpoint-minutes", type=float, default=2.0, help="state saving interval")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=5e-4, help="peak AdamW learning rate")
    parser.add_argument("--warmup-steps", type=int, default=500)
    parser.add_argument("--ema-decay", type=float, default=0.9995)
    parser.add_argument("--class-dropout", type=float, default=0.1, help="null-class probability (for guidance)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", action="store_true", help="torch.compile the training forward")
    parser.add_argument("--log-every", type=int, default=500, help="steps between progress lines")
    parser.add_argument("--grid-steps", type=int, default=50, help="DDIM steps for the sample grid")
    parser.add_argument("--grid-per-class", type=int, default=8, help="grid columns (samples per class)")
    parser.add_argument("--guidance", type=float, default=1.5, help="guidance scale for the sample grid")
    parser.add_argument("--grid-clip-sample", choices=("true", "false", "model"), default="model",
                        help="clip the predicted x0 to [-1, 1] while sampling the grid (default: the scheduler config's)")
    parser.add_argument(
        "--classifier", default=None, help="folder with a trained fmnist_classifier (scores the grid's classes)"
    )
    args = parser.parse_args(argv)
    if args.total_minutes is None:
        args.total_minutes = args.minutes
    return args


def apply_dit_initialization(model: DiTTransformer2DModel) -> None:
    """The DiT paper's initialisation (Peebles & Xie 2023), which diffusers does not apply.

    Xavier-uniform linears with zero bias, N(0, 0.02) timestep-MLP and label embeddings, and zeros in every
    adaLN modulation and in the output projection: each block starts as the identity (adaLN-Zero) and the
    model predicts 0, which trains faster and more stably than the default init.
    """
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    patch_proj = model.pos_embed.proj
    nn.init.xavier_uniform_(patch_proj.weight.view(patch_proj.weight.shape[0], -1))
    nn.init.zeros_(patch_proj.bias)
    for block in model.transformer_blocks:
        embedder = block.norm1.emb
        nn.init.normal_(embedder.class_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(embedder.timestep_embedder.linear_1.weight, std=0.02)
        nn.init.normal_(embedder.timestep_embedder.linear_2.weight, std=0.02)
        nn.init.zeros_(block.norm1.linear.weight)
        nn.init.zeros_(block.norm1.linear.bias)
    for projection in (model.proj_out_1, model.proj_out_2):
        nn.init.zeros_(projection.weight)
        nn.init.zeros_(projection.bias)


@torch.no_grad()
def update_ema(ema_model: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * weights, for all parameters at once."""
    ema_params = list(ema_model.parameters())
    torch._foreach_lerp_(ema_params, [p.detach() for p in model.parameters()], 1.0 - decay)


def model_config(args: argparse.Namespace) -> dict[str, Any]:
    return {**ARCHS[args.arch], **json.loads(args.config_override or "{}")}


def schedule_config(args: argparse.Namespace) -> dict[str, Any]:
    """The training noise schedule (saved with the model): the arch's, or --beta-schedule's."""
    schedule = dict(SCHEDULES[args.arch])
    if args.beta_schedule == "linear" and schedule["beta_schedule"] != "linear":
        schedule.update(BENCHMARK_SCHEDULER_CONFIG)
    elif args.beta_schedule == "squaredcos_cap_v2":
        schedule = {k: v for k, v in schedule.items() if k not in ("beta_start", "beta_end")}
        schedule["beta_schedule"] = "squaredcos_cap_v2"
    return schedule


def save_state(folder: Path, state: dict[str, Any]) -> None:
    """Write the training state atomically (a call killed mid-write leaves the previous state intact)."""
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / (STATE_NAME + ".partial")
    torch.save(state, partial)
    os.replace(partial, folder / STATE_NAME)


def load_state(folder: Path, args: argparse.Namespace) -> dict[str, Any] | None:
    """The saved state (tensors on the CPU), or None; refuses a state of a run with other settings."""
    path = folder / STATE_NAME
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    settings = {key: getattr(args, key) for key in RESUME_KEYS}
    differing = sorted(key for key in RESUME_KEYS if state["settings"].get(key) != settings[key])
    if differing:
        raise ValueError(f"{path} is the state of a run with other settings ({', '.join(differing)}): "
                         "use those settings or another --state folder")
    return state


def write_outputs(out: Path, args: argparse.Namespace, config: dict[str, Any], ema_model: nn.Module,
                  record: dict[str, Any]) -> Path:
    """The EMA weights in the arch's layout, the config and the record; returns the record's path."""
    out.mkdir(parents=True, exist_ok=True)
    if args.arch == "benchmark":
        save_benchmark_model(ema_model, out, model_config=config, scheduler_config=schedule_config(args),
                             record=record)
        return out / RECORD_NAME
    state_dict = {name: tensor.detach().float().cpu().contiguous() for name, tensor in ema_model.state_dict().items()}
    save_file(state_dict, out / CHECKPOINT_NAME, metadata={"format": "pt", "weights": "ema"})
    files = {"model": config, "scheduler": schedule_config(args), "null_class_id": NULL_CLASS_ID}
    (out / CONFIG_NAME).write_text(json.dumps(files, indent=2) + "\n")
    (out / TRAINING_RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n")
    return out / TRAINING_RECORD_NAME


def train(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """Train (or resume and go on training), write the output files, and return the training record;
    ``command`` is recorded in it."""
    wall_start = time.perf_counter()
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    # bf16 autocast on GPUs; CPU bf16 matmuls are slow on most CPUs, so the smoke run stays in fp32.
    use_bf16 = device.type == "cuda"
    torch.set_float32_matmul_precision("high")  # TF32 for the fp32 leftovers outside autocast

    # The whole training set lives on the device as one tensor: no DataLoader, no workers, no copies.
    images_uint8, labels = load_fashion_mnist("train", root=args.data)
    images = to_model_space(images_uint8).to(device)
    labels = labels.to(device)
    num_images = images.shape[0]
    print(f"loaded {num_images} training images onto {device} in {time.perf_counter() - wall_start:.1f}s", flush=True)

    config = model_config(args)
    model = build_fmnist_dit(config).to(device)
    apply_dit_initialization(model)
    # Train in eval mode: diffusers' DiT drops labels independently in every block in train mode, while
    # guidance needs the whole model to see the null class at once; labels are dropped here instead.
    # (eval mode changes nothing else: the model has no dropout or batch-norm layers.)
    model.eval()
    ema_model = copy.deepcopy(model).requires_grad_(False)
    num_params = sum(p.numel() for p in model.parameters())
    print(f"DiT ({args.arch}): {num_params / 1e6:.2f}M parameters", flush=True)

    schedule = schedule_config(args)
    alphas_cumprod = DDPMScheduler.from_config(schedule).alphas_cumprod.to(device)
    num_train_timesteps = schedule["num_train_timesteps"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, fused=device.type == "cuda")

    state_folder = Path(args.state) if args.state else None
    resumed = load_state(state_folder, args) if state_folder is not None else None
    start_step, elapsed_before, running_loss, calls = 0, 0.0, None, []
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        ema_model.load_state_dict(resumed["ema"])
        optimizer.load_state_dict(resumed["optimizer"])
        torch.set_rng_state(resumed["rng_cpu"])
        if device.type == "cuda" and resumed.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(resumed["rng_cuda"], device)
        start_step, elapsed_before = int(resumed["step"]), float(resumed["train_seconds"])
        running_loss, calls = float(resumed["running_loss"]), list(json.loads(resumed["calls"]))
        print(f"resumed from {state_folder / STATE_NAME}: step {start_step}, {elapsed_before:.0f} s of "
              f"{args.total_minutes * 60:.0f} s trained", flush=True)
    forward = torch.compile(model) if args.compile else model

    def train_step(step: int, time_fraction: float) -> torch.Tensor:
        batch = torch.randint(0, num_images, (args.batch_size,), device=device)
        x0, y = random_horizontal_flip(images[batch]), labels[batch]
        y = torch.where(torch.rand(args.batch_size, device=device) < args.class_dropout, NULL_CLASS_ID, y)
        t = torch.randint(0, num_train_timesteps, (args.batch_size,), device=device)
        noise = torch.randn_like(x0)
        alpha_bar = alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = alpha_bar.sqrt() * x0 + (1.0 - alpha_bar).sqrt() * noise
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            predicted_noise = forward(x_t, timestep=t, class_labels=y).sample
        loss = F.mse_loss(predicted_noise.float(), noise)

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, time_fraction, args.lr, args.warmup_steps, final_fraction=0.1)
        optimizer.step()
        # EMA warm-up: early on the average follows the weights closely instead of remembering the init.
        update_ema(ema_model, model, min(args.ema_decay, (1 + step) / (10 + step)))
        return loss

    def checkpoint(step: int, train_seconds: float, loss: float, this_call: dict[str, Any] | None = None) -> None:
        if state_folder is None:
            return
        save_state(state_folder, {
            "settings": {key: getattr(args, key) for key in RESUME_KEYS},
            "model": model.state_dict(), "ema": ema_model.state_dict(), "optimizer": optimizer.state_dict(),
            "step": step, "train_seconds": train_seconds, "running_loss": loss,
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "calls": json.dumps(calls + ([this_call] if this_call else [])),
        })

    run = train_for(args.minutes, train_step, optimizer, batch_size=args.batch_size, log_every=args.log_every,
                    loss_smoothing=0.01, device=device, total_minutes=args.total_minutes, start_step=start_step,
                    elapsed_before=elapsed_before, running_loss=running_loss,
                    checkpoint_every=args.checkpoint_minutes * 60, checkpoint=checkpoint)
    this_call = {"command": command, "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "device": device_name(device), "steps": run.call_steps, "train_seconds": run.seconds,
                 "compiled": args.compile}
    calls.append(this_call)
    checkpoint(run.steps, run.total_seconds, run.final_loss)
    print(f"trained {run.call_steps} steps in {run.seconds:.1f}s (run: {run.steps} steps, {run.total_seconds:.0f} s of "
          f"{args.total_minutes * 60:.0f} s), final loss {run.final_loss:.4f}", flush=True)

    out = Path(args.out)
    record: dict[str, Any] = {
        "command": command,
        "date_utc": this_call["date_utc"],
        "device": device_name(device),
        "torch_version": torch.__version__,
        "diffusers_version": diffusers.__version__,
        "arch": args.arch,
        "model": config,
        "parameters": num_params,
        "steps": run.steps,
        "batch_size": args.batch_size,
        "images_seen": run.steps * args.batch_size,
        "epochs": run.steps * args.batch_size / num_images,
        "peak_lr": args.lr,
        "warmup_steps": args.warmup_steps,
        "ema_decay": args.ema_decay,
        "class_dropout": args.class_dropout,
        "beta_schedule": schedule["beta_schedule"],
        "autocast": "bf16" if use_bf16 else "none (fp32)",
        "compiled": args.compile,
        "seed": args.seed,
        "budget_minutes": args.total_minutes,
        "train_seconds": run.total_seconds,
        "finished": run.finished,
        "calls": calls,
        "final_loss": run.final_loss,
        "final_loss_note": "running mean (per-step EMA, weight 0.01) of the per-batch epsilon MSE",
        "weights": "EMA" if args.arch == "embedded" else "EMA, stored in bf16",
    }
    # Written now and again below: if sampling the grid fails, the checkpoint is still complete.
    record_path = write_outputs(out, args, config, ema_model, record)
    if args.arch == "benchmark":
        write_reference_output(out)

    # Sample from the saved files, through the package loader, so the grid shows what ships.
    if args.arch == "benchmark":
        shipped, grid_name = load_benchmark_model(out, device=device), BENCHMARK_GRID_NAME
    else:
        shipped, grid_name = load_embedded_model(device=device, directory=out), GRID_NAME
    grid_labels = torch.arange(NUM_CLASSES).repeat_interleave(args.grid_per_class)
    clip = {"true": True, "false": False, "model": None}[args.grid_clip_sample]
    samples = sample(shipped, grid_labels, steps=args.grid_steps, guidance_scale=args.guidance, seed=args.seed,
                     batch_size=256, scheduler_config=schedule, clip_sample=clip, progress=False)
    save_image_grid(from_model_space(samples), rows=NUM_CLASSES, path=out / grid_name)
    record["sample_grid"] = {
        "file": grid_name,
        "scheduler": "ddim",
        "steps": args.grid_steps,
        "guidance_scale": args.guidance,
        "clip_sample": schedule["clip_sample"] if clip is None else clip,
        "per_class": args.grid_per_class,
    }
    if args.classifier:
        classifier = load_classifier(device=device, directory=args.classifier)
        with torch.no_grad():
            predicted = classifier(samples).argmax(dim=1).cpu()
        agreement = (predicted == grid_labels).float().mean().item()
        record["sample_grid"]["classifier_agreement"] = agreement
        print(f"the classifier agrees with the requested class on {agreement:.1%} of the grid", flush=True)
    record["wall_seconds"] = time.perf_counter() - wall_start
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}: weights, config, {record_path.name}, {grid_name}", flush=True)
    return record


def main(argv: list[str] | None = None) -> None:
    """Run from the command line (argv None) or from Python with an explicit argument list."""
    run_script(train, parse_args, __file__, argv)


if __name__ == "__main__":
    main()
