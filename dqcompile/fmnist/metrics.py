"""Image-quality metrics (FID, KID, IS, precision/recall), class accuracy of samples, and fidelity of a
quantized model to the float one.

``generative_metrics`` runs torch-fidelity on in-memory uint8 images with the Fashion-MNIST classifier as
the feature space (dqcompile.fmnist.features). ``class_accuracy`` is the share of samples that the
classifier puts in the class they were asked for. ``fidelity_to_reference`` compares two tensors produced
from the same noise (final images, or one step's model outputs): PSNR and relative L2.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from dqcompile.fmnist.data import IMAGE_SIZE, MODEL_IMAGE_SIZE, to_model_space

__all__ = ["UInt8ImageDataset", "class_accuracy", "generative_metrics", "fidelity_to_reference"]

# Nominal value ranges for PSNR: 8-bit codes, and model space [-1, 1].
UINT8_RANGE = 255.0
MODEL_SPACE_RANGE = 2.0


class UInt8ImageDataset(Dataset):
    """In-memory uint8 images served as torch-fidelity expects them: one [3, H, W] uint8 tensor per item.

    Accepts [N, 28, 28], [N, 1, H, W] or [N, 3, H, W]; 28x28 Fashion-MNIST images are padded to 32x32
    with the black background, as the model sees them; grey images are repeated to 3 channels.
    """

    def __init__(self, images: torch.Tensor):
        if images.dtype != torch.uint8:
            raise TypeError(f"expected uint8 images, got {images.dtype}")
        if images.dim() == 3:
            images = images.unsqueeze(1)
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected [N, 28, 28], [N, 1, H, W] or [N, 3, H, W] images, got {tuple(images.shape)}")
        if images.shape[-2:] == (IMAGE_SIZE, IMAGE_SIZE):
            pad = (MODEL_IMAGE_SIZE - IMAGE_SIZE) // 2
            images = F.pad(images, (pad, pad, pad, pad), value=0)
        self.images = images.expand(-1, 3, -1, -1).contiguous().cpu()

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]


def generative_metrics(
    generated_uint8: torch.Tensor,
    reference_uint8: torch.Tensor,
    *,
    kid_subset_size: int | None = None,
    kid_subsets: int = 100,
    prc: bool = True,
    isc: bool = True,
    classifier_dir: str | Path | None = None,
    batch_size: int = 500,
    device: str | torch.device | None = None,
    seed: int = 2020,
    verbose: bool = False,
) -> dict[str, float]:
    """FID, KID, Inception Score (over the classifier's logits) and precision/recall of generated images.

    Args:
        generated_uint8, reference_uint8: uint8 images, [N, 28, 28] or [N, 1 or 3, H, W]
            (the reference of the evaluation protocol is the Fashion-MNIST test split).
        kid_subset_size: KID subset size; default min(1000, both set sizes).
        kid_subsets: number of KID subsets.
        prc: compute precision / recall (k = 3 nearest neighbours, torch-fidelity's default).
        isc: compute the Inception Score (its splits: min(10, N)).
        classifier_dir: folder with the classifier files; default: the shipped classifier.
        batch_size: feature extraction batch size.
        device: where features are computed; default CUDA when available.
        seed: torch-fidelity's seed (KID subsets, IS splits).
        verbose: let torch-fidelity print progress.

    Returns:
        dict with fid, kid_mean, kid_std, and isc_mean, isc_std (if isc), precision, recall, f_score
        (if prc), num_generated, num_reference.
    """
    # Imported here so that dqcompile.fmnist (sampling, fidelity) works without torch-fidelity installed.
    import torch_fidelity

    from dqcompile.fmnist.features import FEATURE_EXTRACTOR_NAME

    generated, reference = UInt8ImageDataset(generated_uint8), UInt8ImageDataset(reference_uint8)
    num_generated, num_reference = len(generated), len(reference)
    if kid_subset_size is None:
        kid_subset_size = min(1000, num_generated, num_reference)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    raw = torch_fidelity.calculate_metrics(
        input1=generated,
        input2=reference,
        cuda=torch.device(device).type == "cuda",
        batch_size=batch_size,
        fid=True,
        kid=True,
        isc=isc,
        prc=prc,
        feature_extractor=FEATURE_EXTRACTOR_NAME,
        feature_extractor_weights_path=None if classifier_dir is None else str(classifier_dir),
        kid_subset_size=kid_subset_size,
        kid_subsets=kid_subsets,
        isc_splits=min(10, num_generated),
        rng_seed=seed,
        # In-memory inputs have no stable name to cache features under; workers would only copy tensors.
        cache=False,
        save_cpu_ram=True,
        verbose=verbose,
    )
    result = {
        "fid": raw[torch_fidelity.KEY_METRIC_FID],
        "kid_mean": raw[torch_fidelity.KEY_METRIC_KID_MEAN],
        "kid_std": raw[torch_fidelity.KEY_METRIC_KID_STD],
    }
    if isc:
        result["isc_mean"] = raw[torch_fidelity.KEY_METRIC_ISC_MEAN]
        result["isc_std"] = raw[torch_fidelity.KEY_METRIC_ISC_STD]
    if prc:
        result["precision"] = raw[torch_fidelity.KEY_METRIC_PRECISION]
        result["recall"] = raw[torch_fidelity.KEY_METRIC_RECALL]
        result["f_score"] = raw[torch_fidelity.KEY_METRIC_F_SCORE]
    result["num_generated"] = num_generated
    result["num_reference"] = num_reference
    return {key: float(value) for key, value in result.items()}


def fidelity_to_reference(
    x: torch.Tensor, reference: torch.Tensor, data_range: float | None = None
) -> dict[str, Any]:
    """PSNR and relative L2 of ``x`` against ``reference`` (same shape), e.g. quantized vs float images.

    psnr_db = 10 log10(data_range^2 / mean((x - reference)^2)), inf when equal;
    rel_l2 = ||x - reference||_2 / ||reference||_2 over all elements (0 when equal, inf if the reference is
    0 and x is not). ``data_range`` defaults to 255 for uint8 tensors and 2 (model space [-1, 1]) for
    float tensors; pass it explicitly for anything else (e.g. epsilon outputs). Computed in float64.
    """
    if x.shape != reference.shape:
        raise ValueError(f"shape mismatch: {tuple(x.shape)} vs {tuple(reference.shape)}")
    if data_range is None:
        data_range = UINT8_RANGE if reference.dtype == torch.uint8 else MODEL_SPACE_RANGE
    difference = x.double() - reference.double()
    squared_error = difference.square().sum().item()
    mse = squared_error / max(difference.numel(), 1)
    psnr_db = math.inf if mse == 0.0 else 10.0 * math.log10(data_range**2 / mse)
    reference_norm = reference.double().norm().item()
    if squared_error == 0.0:
        rel_l2 = 0.0
    elif reference_norm == 0.0:
        rel_l2 = math.inf
    else:
        rel_l2 = math.sqrt(squared_error) / reference_norm
    return {"psnr_db": psnr_db, "rel_l2": rel_l2}


@torch.no_grad()
def class_accuracy(
    images_uint8: torch.Tensor,
    labels: torch.Tensor,
    *,
    classifier: torch.nn.Module | None = None,
    classifier_dir: str | Path | None = None,
    batch_size: int = 1000,
    device: str | torch.device | None = None,
) -> float:
    """The share of generated images that the classifier assigns to the class they were sampled for.

    images_uint8: uint8 images [N, 1, 32, 32] or [N, 28, 28] (what the FID sees); labels: int [N].
    classifier: a loaded classifier (default: the shipped one, or the one in ``classifier_dir``).
    """
    from dqcompile.fmnist.classifier import load_classifier

    if images_uint8.shape[0] != labels.numel():
        raise ValueError(f"{images_uint8.shape[0]} images but {labels.numel()} labels")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if classifier is None:
        classifier = load_classifier(device=device, directory=classifier_dir)
    classifier_device = next(classifier.parameters()).device
    correct = 0
    for start in range(0, images_uint8.shape[0], batch_size):
        batch = to_model_space(images_uint8[start : start + batch_size]).to(classifier_device)
        predicted = classifier(batch).argmax(dim=1).cpu()
        correct += int((predicted == labels[start : start + batch_size].cpu()).sum())
    return correct / max(images_uint8.shape[0], 1)
