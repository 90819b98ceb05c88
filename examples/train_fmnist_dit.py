#!/usr/bin/env python
"""Train the embedded default model: a class-conditional DiT on Fashion-MNIST (32x32, 1 channel).

GPU (the shipped checkpoint; about 7 minutes of training on one H100):

    PYTHONPATH=. python examples/train_fmnist_dit.py --data .data/fashion-mnist --out $OUT/fmnist --minutes 7

CPU smoke run (seconds):

    PYTHONPATH=. python examples/train_fmnist_dit.py --data /usr/share/datasets/fashion-mnist --out /tmp/fm \
        --device cpu --minutes 0.05 --batch-size 8 --grid-steps 2 --grid-per-class 1

Writes into --out: fmnist_dit.safetensors (EMA weights, fp32), fmnist_dit.json (model + scheduler config),
fmnist_dit_training.json (how it was trained) and fmnist_dit_samples.png (10 classes x --grid-per-class,
DDIM --grid-steps steps, guidance --guidance). Training runs for a wall-clock budget (--minutes) rather
than a step count, so that it fits a fixed GPU slot; the learning rate decays over that budget.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="folder with the four Fashion-MNIST .gz files")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--minutes", type=float, default=7.0, help="wall-clock training budget")
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
    parser.add_argument(
        "--classifier", default=None, help="folder with a trained fmnist_classifier (scores the grid's classes)"
    )
    return parser.parse_args(argv)


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


def train(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """Train, write the output files, and return the training record; ``command`` is recorded in it."""
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

    model = build_fmnist_dit().to(device)
    apply_dit_initialization(model)
    # Train in eval mode: diffusers' DiT drops labels independently in every block in train mode, while
    # guidance needs the whole model to see the null class at once; labels are dropped here instead.
    # (eval mode changes nothing else: the model has no dropout or batch-norm layers.)
    model.eval()
    ema_model = copy.deepcopy(model).requires_grad_(False)
    forward = torch.compile(model) if args.compile else model
    num_params = sum(p.numel() for p in model.parameters())
    print(f"DiT: {num_params / 1e6:.2f}M parameters", flush=True)

    alphas_cumprod = DDPMScheduler.from_config(FMNIST_SCHEDULER_CONFIG).alphas_cumprod.to(device)
    num_train_timesteps = FMNIST_SCHEDULER_CONFIG["num_train_timesteps"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, fused=device.type == "cuda")

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

    run = train_for(args.minutes, train_step, optimizer, batch_size=args.batch_size, log_every=args.log_every,
                    loss_smoothing=0.01, device=device)
    print(f"trained {run.steps} steps in {run.seconds:.1f}s, final loss {run.final_loss:.4f}", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    state_dict = {name: tensor.detach().float().cpu().contiguous() for name, tensor in ema_model.state_dict().items()}
    save_file(state_dict, out / CHECKPOINT_NAME, metadata={"format": "pt", "weights": "ema"})
    config = {"model": FMNIST_DIT_CONFIG, "scheduler": FMNIST_SCHEDULER_CONFIG, "null_class_id": NULL_CLASS_ID}
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")

    record: dict[str, Any] = {
        "command": command,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "torch_version": torch.__version__,
        "diffusers_version": diffusers.__version__,
        "parameters": num_params,
        "steps": run.steps,
        "batch_size": args.batch_size,
        "images_seen": run.steps * args.batch_size,
        "epochs": run.steps * args.batch_size / num_images,
        "peak_lr": args.lr,
        "warmup_steps": args.warmup_steps,
        "ema_decay": args.ema_decay,
        "class_dropout": args.class_dropout,
        "autocast": "bf16" if use_bf16 else "none (fp32)",
        "compiled": args.compile,
        "seed": args.seed,
        "budget_minutes": args.minutes,
        "train_seconds": run.seconds,
        "final_loss": run.final_loss,
        "final_loss_note": "running mean (per-step EMA, weight 0.01) of the per-batch epsilon MSE",
        "weights": "EMA",
    }
    # Written now and again below: if sampling the grid fails, the checkpoint is still complete.
    record_path = out / TRAINING_RECORD_NAME
    record_path.write_text(json.dumps(record, indent=2) + "\n")

    # Sample from the saved files, through the package loader, so the grid shows what ships.
    shipped = load_embedded_model(device=device, directory=out)
    grid_labels = torch.arange(NUM_CLASSES).repeat_interleave(args.grid_per_class)
    samples = sample(
        shipped, grid_labels, steps=args.grid_steps, guidance_scale=args.guidance, seed=args.seed, batch_size=256
    )
    save_image_grid(from_model_space(samples), rows=NUM_CLASSES, path=out / GRID_NAME)
    record["sample_grid"] = {
        "file": GRID_NAME,
        "scheduler": "ddim",
        "steps": args.grid_steps,
        "guidance_scale": args.guidance,
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
    print(f"wrote {out / CHECKPOINT_NAME}, {CONFIG_NAME}, {TRAINING_RECORD_NAME}, {GRID_NAME}", flush=True)
    return record


def main(argv: list[str] | None = None) -> None:
    """Run from the command line (argv None) or from Python with an explicit argument list."""
    run_script(train, parse_args, __file__, argv)


if __name__ == "__main__":
    main()
