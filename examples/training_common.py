"""What the two training examples share: the learning-rate schedule and the device's name for the record."""

from __future__ import annotations

import math

import torch


def learning_rate(step: int, time_fraction: float, peak: float, warmup_steps: int, final_fraction: float) -> float:
    """Linear warm-up over steps, then cosine decay over the wall-clock budget to final_fraction * peak.

    The schedule follows wall-clock time, not a step count, because the examples train for a time budget.
    """
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    floor = final_fraction * peak
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * min(time_fraction, 1.0)))


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU with its thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({torch.get_num_threads()} threads)"
