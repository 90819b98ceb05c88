"""Evaluation: sampling, image-quality metrics (torch-fidelity) and fidelity to the float model.

Only ``generative_metrics`` and the feature extractor need torch-fidelity; they import it on first use,
so that sampling (e.g. in the training scripts, on machines without torch-fidelity) does not require it.
Importing ``dqcompile.eval.features`` registers the "fmnist-classifier" feature extractor.
"""

from __future__ import annotations

import importlib
from typing import Any

from dqcompile.eval.grid import image_grid, save_image_grid
from dqcompile.eval.metrics import UInt8ImageDataset, fidelity_to_reference, generative_metrics
from dqcompile.eval.sampling import image_noise_generators, sample

_FROM_FEATURES = ("FEATURE_EXTRACTOR_NAME", "FashionMNISTFeatureExtractor")

__all__ = [
    "UInt8ImageDataset",
    "fidelity_to_reference",
    "generative_metrics",
    "image_grid",
    "image_noise_generators",
    "sample",
    "save_image_grid",
    *_FROM_FEATURES,
]


def __getattr__(name: str) -> Any:
    if name in _FROM_FEATURES:
        return getattr(importlib.import_module("dqcompile.eval.features"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
