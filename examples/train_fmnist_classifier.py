#!/usr/bin/env python
"""Train the Fashion-MNIST classifier whose penultimate features are dqcompile's FID feature space.

GPU (the shipped checkpoint; about 1 minute on one H100):

    PYTHONPATH=. python examples/train_fmnist_classifier.py --data .data/fashion-mnist --out $OUT/fmnist --minutes 1

CPU smoke run (seconds):

    PYTHONPATH=. python examples/train_fmnist_classifier.py --data /usr/share/datasets/fashion-mnist --out /tmp/fm \
        --device cpu --minutes 0.05 --batch-size 32 --eval-limit 500

Writes into --out: fmnist_classifier.safetensors (fp32) and fmnist_classifier.json (architecture, measured
test accuracy, how it was trained). Inputs are model-space images (1 x 32 x 32 in [-1, 1], the DiT's space).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from dqcompile.fmnist.classifier import (
    CLASSIFIER_CHECKPOINT_NAME,
    CLASSIFIER_CONFIG,
    CLASSIFIER_CONFIG_NAME,
    FashionMNISTClassifier,
    build_classifier,
)
from dqcompile.fmnist.data import load_fashion_mnist, to_model_space

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the examples' shared helpers, wherever run from
from training_common import device_name, learning_rate, random_horizontal_flip, run_script, train_for  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="folder with the four Fashion-MNIST .gz files")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--minutes", type=float, default=1.0, help="wall-clock training budget")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate")
    parser.add_argument("--warmup-steps", type=int, default=200)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=1000, help="steps between progress lines")
    parser.add_argument(
        "--eval-limit", type=int, default=None, help="score only the first N test images (for quick CPU runs)"
    )
    return parser.parse_args(argv)


@torch.no_grad()
def accuracy(model: FashionMNISTClassifier, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``model`` (put in eval mode) on model-space images."""
    model.eval()
    correct = 0
    for start in range(0, images.shape[0], batch_size):
        logits = model(images[start : start + batch_size])
        correct += (logits.argmax(dim=1) == labels[start : start + batch_size]).sum().item()
    return correct / images.shape[0]


def train(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """Train, write the output files, and return the training record; ``command`` is recorded in it."""
    wall_start = time.perf_counter()
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    use_bf16 = device.type == "cuda"  # CPU bf16 is slow on most CPUs; the smoke run stays fp32

    # Whole splits on the device as single tensors: no DataLoader, no workers.
    train_uint8, train_labels = load_fashion_mnist("train", root=args.data)
    test_uint8, test_labels = load_fashion_mnist("test", root=args.data)
    if args.eval_limit is not None:
        test_uint8, test_labels = test_uint8[: args.eval_limit], test_labels[: args.eval_limit]
    train_images, train_labels = to_model_space(train_uint8).to(device), train_labels.to(device)
    test_images, test_labels = to_model_space(test_uint8).to(device), test_labels.to(device)
    num_images = train_images.shape[0]

    model = build_classifier().to(device)
    num_params = sum(p.numel() for p in model.parameters())
    print(f"classifier: {num_params / 1e3:.0f}k parameters; data on {device}", flush=True)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=args.lr, weight_decay=args.weight_decay, fused=device.type == "cuda"
    )

    def train_step(step: int, time_fraction: float) -> torch.Tensor:
        batch = torch.randint(0, num_images, (args.batch_size,), device=device)
        x, y = random_horizontal_flip(train_images[batch]), train_labels[batch]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, time_fraction, args.lr, args.warmup_steps, final_fraction=0.0)
        optimizer.step()
        return loss

    model.train()
    run = train_for(args.minutes, train_step, optimizer, batch_size=args.batch_size, log_every=args.log_every,
                    loss_smoothing=0.02, device=device)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    state_dict = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    save_file(state_dict, out / CLASSIFIER_CHECKPOINT_NAME, metadata={"format": "pt"})
    record: dict[str, Any] = {
        "model": CLASSIFIER_CONFIG,
        "feature_dim": model.feature_dim,
        # The weights are fp32 (autocast only lowers the matmuls), so this is the shipped model's accuracy.
        "test_accuracy": accuracy(model, test_images, test_labels),
        "test_images": int(test_images.shape[0]),
        "training": {
            "command": command,
            "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": device_name(device),
            "torch_version": torch.__version__,
            "parameters": num_params,
            "steps": run.steps,
            "batch_size": args.batch_size,
            "epochs": run.steps * args.batch_size / num_images,
            "peak_lr": args.lr,
            "weight_decay": args.weight_decay,
            "autocast": "bf16" if use_bf16 else "none (fp32)",
            "seed": args.seed,
            "budget_minutes": args.minutes,
            "train_seconds": run.seconds,
            "final_loss": run.final_loss,
            "wall_seconds": time.perf_counter() - wall_start,
        },
    }
    (out / CLASSIFIER_CONFIG_NAME).write_text(json.dumps(record, indent=2) + "\n")
    print(
        f"trained {run.steps} steps in {run.seconds:.1f}s; test accuracy {record['test_accuracy']:.4f} "
        f"on {record['test_images']} images; wrote {out / CLASSIFIER_CHECKPOINT_NAME}",
        flush=True,
    )
    return record


def main(argv: list[str] | None = None) -> None:
    """Run from the command line (argv None) or from Python with an explicit argument list."""
    run_script(train, parse_args, __file__, argv)


if __name__ == "__main__":
    main()
