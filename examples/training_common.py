"""What the two training examples share: the time-budgeted loop with its progress log (resumable: a run
may be split over several calls, each with its own time budget, under one learning-rate schedule over the
total budget), the learning-rate schedule, the flip augmentation and the device's name for the record."""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


def learning_rate(step: int, time_fraction: float, peak: float, warmup_steps: int, final_fraction: float) -> float:
    """Linear warm-up over steps, then cosine decay over the wall-clock budget to final_fraction * peak.

    The schedule follows wall-clock time, not a step count, because the examples train for a time budget.
    """
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    floor = final_fraction * peak
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * min(time_fraction, 1.0)))


def random_horizontal_flip(images: torch.Tensor) -> torch.Tensor:
    """Each image of [N, C, H, W] mirrored left-right with probability 1/2. Garments are symmetric enough
    that this preserves the label."""
    flip = torch.rand(images.shape[0], device=images.device) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


@dataclass(frozen=True)
class TrainingRun:
    """What a time-budgeted loop did: optimizer steps (all calls together), this call's steps and wall
    time, the training time of all calls together, the final running loss, and whether the total budget
    is spent (False: another call may resume the run)."""

    steps: int
    seconds: float
    final_loss: float
    call_steps: int = 0
    total_seconds: float = 0.0
    finished: bool = True


def train_for(minutes: float, train_step: Callable[[int, float], torch.Tensor], optimizer: torch.optim.Optimizer,
              *, batch_size: int, log_every: int, loss_smoothing: float, device: torch.device,
              total_minutes: float | None = None, start_step: int = 0, elapsed_before: float = 0.0,
              running_loss: float | None = None, checkpoint_every: float | None = None,
              checkpoint: Callable[[int, float, float], None] | None = None) -> TrainingRun:
    """Call train_step(step, time_fraction) -> loss until `minutes` of wall clock have passed in this call,
    or the run's `total_minutes` (default: `minutes`) with the `elapsed_before` seconds of earlier calls.

    time_fraction is the share of the total budget spent, so that a run resumed over several calls
    (start_step, elapsed_before and running_loss from its last checkpoint) follows one schedule.
    checkpoint(step, training_seconds, running_loss) is called every `checkpoint_every` seconds (if given).
    The running loss is an exponential mean (weight `loss_smoothing`) kept on the device, so no step waits
    for the host; every `log_every` steps a line gives it, the learning rate and the throughput.
    Raises RuntimeError when the budget ends before the first step.
    """
    total_seconds_budget = (total_minutes if total_minutes is not None else minutes) * 60.0
    call_budget = min(minutes * 60.0, total_seconds_budget - elapsed_before)
    step = start_step
    loss_value = None if running_loss is None else torch.tensor(running_loss, device=device)
    log_time, log_step = time.perf_counter(), step
    start = time.perf_counter()
    last_checkpoint = start
    while (elapsed := time.perf_counter() - start) < call_budget:
        loss = train_step(step, (elapsed_before + elapsed) / total_seconds_budget).detach()
        loss_value = loss if loss_value is None else loss_value.lerp(loss, loss_smoothing)
        step += 1
        if step % log_every == 0:
            now = time.perf_counter()
            images_per_second = (step - log_step) * batch_size / (now - log_time)
            print(
                f"step {step:6d}  loss {loss_value.item():.4f}  lr {optimizer.param_groups[0]['lr']:.2e}  "
                f"{images_per_second:8.0f} img/s  {elapsed_before + now - start:6.1f}s",
                flush=True,
            )
            log_time, log_step = now, step
        if checkpoint is not None and checkpoint_every and time.perf_counter() - last_checkpoint > checkpoint_every:
            checkpoint(step, elapsed_before + time.perf_counter() - start, loss_value.item())
            last_checkpoint = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    if loss_value is None:
        raise RuntimeError("the time budget ended before the first training step; raise --minutes")
    total = elapsed_before + seconds
    return TrainingRun(steps=step, seconds=seconds, final_loss=loss_value.item(), call_steps=step - start_step,
                       total_seconds=total, finished=total >= total_seconds_budget)


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU with its thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({torch.get_num_threads()} threads)"


def run_script(train: Callable[[argparse.Namespace, str], object],
               parse_args: Callable[[list[str] | None], argparse.Namespace], script: str,
               argv: list[str] | None) -> None:
    """An example's main(): train(parse_args(argv), command), with the command line recorded as it was
    given (argv None: this process's) or as `python script ...` for a call from Python."""
    if argv is None:
        command, argv = shlex.join(["python", *sys.argv]), sys.argv[1:]
    else:
        command = shlex.join(["python", script, *argv])
    train(parse_args(argv), command)
