"""Fitness functions for Q-DiT's group-size search on the Fashion-MNIST example (lower is better).

Each builder takes the float model and the sampling protocol and returns ``fitness(candidate) -> float``,
the callable the search takes as its fitness argument. Every candidate samples the same classes (0, 1,
..., 9, 0, ...) from the same noise, with DDIM and the embedded model's schedule (dqcompile.fmnist.sample).

- ``fid_fitness``: FID of the candidate's samples against the Fashion-MNIST test split, in the feature
  space of the shipped classifier (generative_metrics, without IS and precision/recall).
- ``proxy_fitness``: mean squared error of the candidate's final images against the float model's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from dqcompile.fmnist.dit import NUM_CLASSES

__all__ = ["Fitness", "class_labels", "fid_fitness", "proxy_fitness", "FITNESS_BUILDERS"]

Fitness = Callable[[nn.Module], float]


def class_labels(samples: int, device: torch.device | str) -> torch.Tensor:
    """Class labels 0, 1, ..., 9, 0, ...: balanced over the classes."""
    return (torch.arange(samples) % NUM_CLASSES).to(device)


def proxy_fitness(
    model: nn.Module, *, samples: int, steps: int, guidance_scale: float, seed: int, batch_size: int,
    **sampler: Any,
) -> Fitness:
    """Mean squared error of a candidate's final images against the float model's from the same noise.

    sampler: further keyword arguments of dqcompile.fmnist.sample (e.g. clip_sample=False)."""
    from dqcompile.fmnist.sampling import sample

    def images(candidate: nn.Module) -> torch.Tensor:
        labels = class_labels(samples, next(model.parameters()).device)
        return sample(candidate, labels, steps=steps, guidance_scale=guidance_scale, seed=seed,
                      batch_size=batch_size, progress=False, **sampler)

    reference = images(model)
    return lambda candidate: float((images(candidate) - reference).square().mean())


def fid_fitness(
    model: nn.Module, *, samples: int, steps: int, guidance_scale: float, seed: int, batch_size: int,
    **sampler: Any,
) -> Fitness:
    """FID of a candidate's samples against the Fashion-MNIST test split, in the feature space of the
    shipped classifier. The same noise serves every candidate.

    sampler: further keyword arguments of dqcompile.fmnist.sample (e.g. clip_sample=False)."""
    from dqcompile.fmnist.data import from_model_space, load_fashion_mnist
    from dqcompile.fmnist.metrics import generative_metrics
    from dqcompile.fmnist.sampling import sample

    reference, _ = load_fashion_mnist("test")
    device = next(model.parameters()).device

    def fid(candidate: nn.Module) -> float:
        images = sample(candidate, class_labels(samples, device), steps=steps, guidance_scale=guidance_scale,
                        seed=seed, batch_size=batch_size, progress=False, **sampler)
        return generative_metrics(from_model_space(images), reference, prc=False, isc=False)["fid"]

    return fid


# The search's named fitnesses ("fid", "proxy"), for a caller that takes a name on its command line.
FITNESS_BUILDERS: dict[str, Callable[..., Fitness]] = {"fid": fid_fitness, "proxy": proxy_fitness}
