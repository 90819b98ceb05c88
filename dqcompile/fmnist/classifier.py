"""A small CNN classifier for Fashion-MNIST in model space (1 x 32 x 32, values in [-1, 1]).

Its penultimate layer (global-average-pooled last conv block, 128 values) is the feature space of the
Fashion-MNIST FID / KID / precision-recall (dqcompile.fmnist.features), the role Inception's pool3
features play for ImageNet; its logits give the Inception Score. A classifier trained on this very data
sees what matters for garments (shape, texture, class identity), which Inception at 299 px does not.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from dqcompile.fmnist.dit import data_file

__all__ = [
    "CLASSIFIER_CONFIG",
    "CLASSIFIER_CHECKPOINT_NAME",
    "CLASSIFIER_CONFIG_NAME",
    "FashionMNISTClassifier",
    "build_classifier",
    "load_classifier",
    "classifier_record",
]

CLASSIFIER_CONFIG: dict[str, Any] = {
    "in_channels": 1,
    "widths": [32, 64, 128],  # one conv block per width; each but the last halves the resolution
    "num_classes": 10,
}
CLASSIFIER_CHECKPOINT_NAME = "fmnist_classifier.safetensors"
# The config json also records the measured test accuracy and how the weights were trained.
CLASSIFIER_CONFIG_NAME = "fmnist_classifier.json"


def _conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


class FashionMNISTClassifier(nn.Module):
    """VGG-style CNN: per width two 3x3 conv-BN-ReLU layers, 2x2 max-pool between blocks, global average
    pool, linear head. ``features`` gives the pooled penultimate activations."""

    def __init__(self, in_channels: int = 1, widths: list[int] | tuple[int, ...] = (32, 64, 128), num_classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = []
        previous = in_channels
        for block_index, width in enumerate(widths):
            layers += _conv_bn_relu(previous, width) + _conv_bn_relu(width, width)
            if block_index < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            previous = width
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(previous, num_classes)
        self.feature_dim = previous

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features [N, feature_dim] of model-space images [N, 1, 32, 32]."""
        return self.body(x).mean(dim=(2, 3))

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features [N, feature_dim], logits [N, num_classes]) in one pass."""
        features = self.features(x)
        return features, self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits [N, num_classes]."""
        return self.head(self.features(x))


def build_classifier(config: dict[str, Any] | None = None) -> FashionMNISTClassifier:
    """A randomly initialised classifier with the shipped architecture (or ``config``)."""
    config = config or CLASSIFIER_CONFIG
    return FashionMNISTClassifier(config["in_channels"], config["widths"], config["num_classes"])


_TRAINING_HINT = (
    "Train it with `PYTHONPATH=. python examples/train_fmnist_classifier.py --data DIR --out OUT` (DIR holds "
    "the four Fashion-MNIST .gz files) and copy OUT/fmnist_classifier.safetensors and "
    "OUT/fmnist_classifier.json into dqcompile/fmnist/checkpoints/."
)


def classifier_record(directory: str | Path | None = None) -> dict[str, Any]:
    """The classifier's json: {"model": config, "test_accuracy": ..., "training": {...}}."""
    return json.loads(data_file(CLASSIFIER_CONFIG_NAME, directory, _TRAINING_HINT).read_text())


def load_classifier(
    device: str | torch.device = "cpu", directory: str | Path | None = None
) -> FashionMNISTClassifier:
    """The trained classifier in eval mode, from ``directory`` or the shipped package data."""
    record = classifier_record(directory)
    model = build_classifier(record["model"])
    model.load_state_dict(load_file(data_file(CLASSIFIER_CHECKPOINT_NAME, directory, _TRAINING_HINT)), strict=True)
    return model.to(device).eval()
