"""What every benchmark records beside its figures (device, versions, date, commit), and the one timer."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

Result = TypeVar("Result")


def git_commit() -> str:
    """$DQCOMPILE_COMMIT when set (runs on a copy of the tree whose .git, if any, is not the one sent: the
    lent GPU machine), else HEAD's hash with "-dirty" when the tree has changes, else "unknown"."""
    if commit := os.environ.get("DQCOMPILE_COMMIT"):
        return commit
    repo = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True,
                               check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def run_metadata() -> dict:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()})"
    return {
        "device": device,
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
    }


def timed(function: Callable[..., Result], *args: Any, **kwargs: Any) -> tuple[Result, float]:
    """function(*args, **kwargs) and its wall time in seconds, the device synchronised on both sides
    (GPU work is asynchronous: without that the clock would stop before the work does)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = function(*args, **kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def timed_with_peak(function: Callable[..., Result], *args: Any, **kwargs: Any) -> tuple[Result, float, int | None]:
    """timed(), and the peak CUDA memory allocated during the call in bytes (None without CUDA)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    result, seconds = timed(function, *args, **kwargs)
    return result, seconds, torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None


def median_ms(function: Callable[[], object], *, calls: int = 1, runs: int = 5, warmup: int = 1,
              device: str | None = None) -> dict[str, float]:
    """The one timer of the benchmarks: ms per call of `function`, as a sampler runs it.

    Each run times `calls` consecutive calls (no cache flush between them) with CUDA events on "cuda",
    with the host clock elsewhere (device None: "cuda" when CUDA is available); `warmup` runs first are
    dropped. Returns the median, min and max over `runs` runs, per call. A CUDA graph is timed the same
    way, with `function` = the graph's `replay`.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    per_call: list[float] = []
    for run in range(warmup + runs):
        if device == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                function()
            stop.record()
            stop.synchronize()
            elapsed = start.elapsed_time(stop)
        else:
            begin = time.perf_counter()
            for _ in range(calls):
                function()
            elapsed = (time.perf_counter() - begin) * 1e3
        if run >= warmup:
            per_call.append(elapsed / calls)
    return {"ms": statistics.median(per_call), "min_ms": min(per_call), "max_ms": max(per_call)}


def cpu_groups(parts: int) -> list[list[int]]:
    """This process's CPU cores split into `parts` groups of whole physical cores (hyper-thread siblings
    together), for processes that must not slow each other: two processes pinned to the two threads of
    the same physical cores would still compete."""
    cores = sorted(os.sched_getaffinity(0))
    physical: dict[str, list[int]] = {}
    for core in cores:
        siblings = Path(f"/sys/devices/system/cpu/cpu{core}/topology/thread_siblings_list")
        key = siblings.read_text().strip() if siblings.exists() else str(core)
        physical.setdefault(key, []).append(core)
    units = list(physical.values())
    share = max(1, len(units) // parts)
    return [sorted(c for unit in units[i * share:(i + 1) * share] for c in unit) for i in range(parts)]
