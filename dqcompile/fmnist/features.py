"""The Fashion-MNIST feature extractor for torch-fidelity, registered as "fmnist-classifier".

torch-fidelity hands a feature extractor uint8 images [N, 3, H, W] (it is built for RGB) and asks for
named feature layers. This one converts them back to the classifier's input (1 channel, 32x32, [-1, 1]),
and provides:

- "128" (its width): the classifier's penultimate features (global-average-pooled last conv block), used for FID,
  KID and precision/recall, as Inception's "2048" pool3 features are for ImageNet;
- "logits": its class logits, used for the Inception Score.

The weights come from torch-fidelity's ``feature_extractor_weights_path`` keyword, a folder holding
fmnist_classifier.safetensors + fmnist_classifier.json; default: the classifier shipped with dqcompile.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
import torch_fidelity
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from dqcompile.fmnist.data import IMAGE_SIZE, MODEL_IMAGE_SIZE, to_model_space
from dqcompile.fmnist.classifier import CLASSIFIER_CONFIG, load_classifier

__all__ = ["FEATURE_EXTRACTOR_NAME", "FEATURE_LAYER", "LOGITS_LAYER", "FashionMNISTFeatureExtractor"]

FEATURE_EXTRACTOR_NAME = "fmnist-classifier"
# Named by its width, as torch-fidelity names Inception's layers ("2048").
FEATURE_LAYER = str(CLASSIFIER_CONFIG["widths"][-1])
LOGITS_LAYER = "logits"


def to_classifier_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 3 or 1, H, W] -> model space [N, 1, 32, 32].

    Grey images stored as RGB have three equal channels, so their mean is exact; 28x28 images are padded,
    other sizes are resized (bilinear) to 32x32.
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected uint8 [N, 3, H, W] or [N, 1, H, W] images, got {images.dtype} {tuple(images.shape)}")
    if images.shape[1] == 3:
        images = images.float().mean(dim=1, keepdim=True).round().to(torch.uint8)
    height, width = images.shape[-2:]
    if (height, width) in ((IMAGE_SIZE, IMAGE_SIZE), (MODEL_IMAGE_SIZE, MODEL_IMAGE_SIZE)):
        return to_model_space(images)
    resized = F.interpolate(images.float(), size=(MODEL_IMAGE_SIZE, MODEL_IMAGE_SIZE), mode="bilinear", antialias=True)
    return resized / 127.5 - 1.0


class FashionMNISTFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity feature extractor over dqcompile's Fashion-MNIST classifier."""

    def __init__(self, name: str, features_list: list[str], **kwargs: Any):
        super().__init__(name, features_list)
        self.classifier = load_classifier(directory=kwargs.get("feature_extractor_weights_path"))
        self.classifier.requires_grad_(False)

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return FEATURE_LAYER, LOGITS_LAYER

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return {"isc": LOGITS_LAYER, "fid": FEATURE_LAYER, "kid": FEATURE_LAYER, "prc": FEATURE_LAYER}[metric]

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> torch.Tensor:
        return torch.zeros(1, 3, MODEL_IMAGE_SIZE, MODEL_IMAGE_SIZE, dtype=torch.uint8)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Features in the order of ``self.features_list``, float32 [N, 128] and/or [N, 10]."""
        # torch-fidelity puts the extractor in eval mode; the classifier's batch norm relies on that.
        features, logits = self.classifier.forward_with_features(to_classifier_input(images))
        provided = {FEATURE_LAYER: features.float(), LOGITS_LAYER: logits.float()}
        return tuple(provided[name] for name in self.features_list)


# torch-fidelity refuses a second registration of a name; a re-imported module keeps the first one.
if FEATURE_EXTRACTOR_NAME not in FEATURE_EXTRACTORS_REGISTRY:
    torch_fidelity.register_feature_extractor(FEATURE_EXTRACTOR_NAME, FashionMNISTFeatureExtractor)
