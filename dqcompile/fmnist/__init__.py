"""The Fashion-MNIST example: data, the embedded DiT and its classifier (with their checkpoints), the
benchmark DiT's loader, sampling with the embedded model's defaults, FID/KID/IS/precision-recall in the
classifier's feature space (torch-fidelity), PSNR against the float model, image grids, the Q-DiT search's
fitness functions, and `dqcompile demo`.

The compiler (everything in dqcompile outside this package and the command line) never imports it:
schedulers, null classes and sample shapes reach the core as arguments (tests/test_core_imports.py).

Only the metrics and the feature extractor need torch-fidelity; they import it on first use, so that
sampling and training work without it. Importing ``dqcompile.fmnist.features`` registers the
"fmnist-classifier" feature extractor with torch-fidelity.
"""

from __future__ import annotations

import importlib
from typing import Any

from dqcompile.fmnist.classifier import (
    CLASSIFIER_CONFIG,
    FashionMNISTClassifier,
    build_classifier,
    classifier_record,
    load_classifier,
)
from dqcompile.fmnist.data import (
    CLASS_NAMES,
    from_model_space,
    load_fashion_mnist,
    to_model_space,
)
from dqcompile.fmnist.dit import (
    FMNIST_DIT_CONFIG,
    FMNIST_SCHEDULER_CONFIG,
    NULL_CLASS_ID,
    NUM_CLASSES,
    build_fmnist_dit,
    embedded_training_record,
    load_embedded_config,
    load_embedded_model,
    make_scheduler,
)
from dqcompile.fmnist.grid import image_grid, save_image_grid
from dqcompile.fmnist.metrics import UInt8ImageDataset, class_accuracy, fidelity_to_reference, generative_metrics
from dqcompile.fmnist.sampling import image_noise_generators, sample

_LAZY = {
    "FEATURE_EXTRACTOR_NAME": "dqcompile.fmnist.features",
    "FashionMNISTFeatureExtractor": "dqcompile.fmnist.features",
    "load_benchmark_model": "dqcompile.fmnist.benchmark",
    "benchmark_model_dir": "dqcompile.fmnist.benchmark",
}

__all__ = [
    "CLASSIFIER_CONFIG",
    "CLASS_NAMES",
    "FMNIST_DIT_CONFIG",
    "FMNIST_SCHEDULER_CONFIG",
    "NULL_CLASS_ID",
    "NUM_CLASSES",
    "FashionMNISTClassifier",
    "UInt8ImageDataset",
    "build_classifier",
    "build_fmnist_dit",
    "class_accuracy",
    "classifier_record",
    "embedded_training_record",
    "fidelity_to_reference",
    "from_model_space",
    "generative_metrics",
    "image_grid",
    "image_noise_generators",
    "load_classifier",
    "load_embedded_config",
    "load_embedded_model",
    "load_fashion_mnist",
    "make_scheduler",
    "sample",
    "save_image_grid",
    "to_model_space",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
