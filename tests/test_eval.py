"""Image-quality metrics through torch-fidelity with the Fashion-MNIST feature extractor, PSNR / rel-L2,
and image grids."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from dqcompile.fmnist import data
from dqcompile.fmnist import fidelity_to_reference, generative_metrics, image_grid, save_image_grid
from dqcompile.fmnist.features import FEATURE_EXTRACTOR_NAME, FEATURE_LAYER, FashionMNISTFeatureExtractor
from dqcompile.fmnist.classifier import (
    CLASSIFIER_CHECKPOINT_NAME,
    CLASSIFIER_CONFIG,
    CLASSIFIER_CONFIG_NAME,
    build_classifier,
    load_classifier,
)


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory: pytest.TempPathFactory) -> Path | None:
    """The shipped classifier (None: the package default) or, before one ships, a random one saved to disk.

    Either way the metrics run the full path: files -> loader -> torch-fidelity extractor -> metrics.
    """
    try:
        load_classifier()
        return None
    except FileNotFoundError:
        directory = tmp_path_factory.mktemp("classifier")
        torch.manual_seed(0)
        model = build_classifier()
        # Random batch-norm statistics, so that the random features are not just a scaled identity.
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_var.uniform_(0.5, 2.0)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, directory / CLASSIFIER_CHECKPOINT_NAME)
        (directory / CLASSIFIER_CONFIG_NAME).write_text(json.dumps({"model": CLASSIFIER_CONFIG}))
        return directory


@pytest.fixture(scope="module")
def reference_images() -> torch.Tensor:
    """400 Fashion-MNIST test images (uint8 [N, 28, 28]), or synthetic garment-like blobs without the data."""
    if data.find_fashion_mnist("test") is not None:
        return data.load_fashion_mnist("test")[0][:400]
    generator = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    centers = torch.rand(400, 2, 1, 1, generator=generator) * 10 + 9
    radii = torch.rand(400, 1, 1, generator=generator) * 6 + 4
    inside = ((yy - centers[:, 0]) ** 2 + (xx - centers[:, 1]) ** 2) < radii**2
    return (inside * 200).to(torch.uint8)


def test_extractor_is_registered_and_matches_the_classifier(classifier_dir: Path | None, reference_images) -> None:
    import torch_fidelity.registry

    assert torch_fidelity.registry.FEATURE_EXTRACTORS_REGISTRY[FEATURE_EXTRACTOR_NAME] is FashionMNISTFeatureExtractor
    extractor = FashionMNISTFeatureExtractor(
        FEATURE_EXTRACTOR_NAME, [FEATURE_LAYER, "logits"], feature_extractor_weights_path=classifier_dir
    ).eval()
    images_32 = data.from_model_space(data.to_model_space(reference_images[:8]))
    # What torch-fidelity passes: uint8 RGB.
    features, logits = extractor(images_32.expand(-1, 3, -1, -1))
    classifier = load_classifier(directory=classifier_dir)
    with torch.no_grad():
        expected_features, expected_logits = classifier.forward_with_features(data.to_model_space(images_32))
    assert features.shape == (8, int(FEATURE_LAYER)) and logits.shape == (8, 10)
    torch.testing.assert_close(features, expected_features)
    torch.testing.assert_close(logits, expected_logits)
    # 28x28 grey input is padded like the model's data.
    torch.testing.assert_close(extractor(reference_images[:8].unsqueeze(1))[0], expected_features)


def test_fid_of_a_set_against_itself_is_zero_and_against_noise_large(
    classifier_dir: Path | None, reference_images: torch.Tensor
) -> None:
    # 200 per set: more than the 128 feature dimensions, so that the covariances have full rank.
    first, second = reference_images[:200], reference_images[200:]
    noise = torch.randint(0, 256, (200, 1, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    same = generative_metrics(first, first, classifier_dir=classifier_dir, device="cpu", kid_subset_size=100)
    halves = generative_metrics(first, second, classifier_dir=classifier_dir, device="cpu", prc=False, isc=False)
    vs_noise = generative_metrics(noise, first, classifier_dir=classifier_dir, device="cpu")

    assert set(same) >= {"fid", "kid_mean", "kid_std", "isc_mean", "precision", "recall"}
    assert abs(same["fid"]) < 1e-3 * vs_noise["fid"]
    # KID is unbiased: against itself it scatters around 0 (over random subsets), far below noise's.
    assert abs(same["kid_mean"]) < 0.02 * vs_noise["kid_mean"]
    assert same["precision"] == 1.0 and same["recall"] == 1.0
    # Two halves of one distribution are close; noise is far and lies outside the real manifold.
    assert halves["fid"] < 0.2 * vs_noise["fid"]
    assert vs_noise["precision"] < 0.1
    assert halves["num_generated"] == 200 and halves["num_reference"] == 200
    assert "precision" not in halves and "isc_mean" not in halves
    assert same["isc_mean"] >= 1.0


def test_fidelity_to_reference_exact_values() -> None:
    # Multiples of 1/8 and a shift of 1/8: float32 holds them exactly, so the expected values are exact.
    reference = (torch.arange(400.0) % 16 - 8).view(4, 1, 10, 10) / 8
    shifted = reference + 0.125
    result = fidelity_to_reference(shifted, reference)
    # mse = 1/64 in model space (range 2): PSNR = 10 log10(4 * 64).
    assert result["psnr_db"] == pytest.approx(10 * math.log10(256.0), abs=1e-12)
    assert result["rel_l2"] == pytest.approx(0.125 * 20.0 / reference.double().norm().item(), rel=1e-12)

    codes = torch.full((2, 1, 4, 4), 100, dtype=torch.uint8)
    result = fidelity_to_reference(codes + 1, codes)  # one code off everywhere, range 255
    assert result["psnr_db"] == pytest.approx(20 * math.log10(255.0), abs=1e-12)
    assert result["rel_l2"] == pytest.approx(0.01, abs=1e-12)

    assert fidelity_to_reference(reference, reference) == {"psnr_db": math.inf, "rel_l2": 0.0}
    assert fidelity_to_reference(reference, torch.zeros_like(reference))["rel_l2"] == math.inf
    assert fidelity_to_reference(shifted, reference, data_range=0.125)["psnr_db"] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="shape"):
        fidelity_to_reference(reference, reference[:2])


def test_image_grid_layout_and_model_space_input(tmp_path: Path) -> None:
    codes = torch.arange(6, dtype=torch.uint8).mul(40).view(6, 1, 1, 1).expand(6, 1, 4, 4).contiguous()
    grid = image_grid(codes, rows=2, padding=1)
    assert grid.size == (3 * 5 + 1, 2 * 5 + 1)  # (width, height): 3 columns, 2 rows of 4 px + 1 px gaps
    pixels = torch.tensor(list(grid.getdata()), dtype=torch.uint8).view(grid.size[1], grid.size[0])
    assert pixels[1, 1] == 0 and pixels[1, 6] == 40 and pixels[6, 1] == 120  # row-major tiles
    assert pixels[0, 0] == 128  # the grey separator
    # Model-space floats give the same picture as their uint8 codes.
    assert list(image_grid(codes.float() / 127.5 - 1.0, rows=2, padding=1).getdata()) == list(grid.getdata())
    path = save_image_grid(codes, rows=3, path=tmp_path / "grid.png", scale=2)
    assert Image.open(path).size == (2 * (2 * 6 + 2), 2 * (3 * 6 + 2))  # default padding 2, doubled
    with pytest.raises(ValueError, match="rows"):
        image_grid(codes, rows=4)
