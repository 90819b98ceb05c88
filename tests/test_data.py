"""Fashion-MNIST loading (search order, IDX parsing, download) and the model pixel space."""

from __future__ import annotations

import gzip
import hashlib
import io
import urllib.request
from pathlib import Path

import pytest
import torch

from dqcompile.fmnist import data

REAL_DATA = data.find_fashion_mnist("test") is not None
needs_real_data = pytest.mark.skipif(not REAL_DATA, reason="Fashion-MNIST files not installed")


def write_idx(directory: Path, split: str, images: torch.Tensor, labels: torch.Tensor) -> None:
    """Write a split as gzip'd IDX files, the release format."""
    prefix = {"train": "train", "test": "t10k"}[split]
    count = images.shape[0]
    image_header = (0x00000803).to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in (count, 28, 28))
    label_header = (0x00000801).to_bytes(4, "big") + count.to_bytes(4, "big")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(image_header + images.numpy().tobytes()))
    (directory / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(label_header + labels.to(torch.uint8).numpy().tobytes())
    )


@pytest.fixture
def no_default_dirs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Point the system dir, the env var and the cache at empty places; returns the cache dir."""
    monkeypatch.setattr(data, "SYSTEM_DIR", tmp_path / "system")
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return data.default_cache_dir()


@needs_real_data
def test_real_test_split_shapes_dtypes_and_labels() -> None:
    images, labels = data.load_fashion_mnist("test")
    assert images.shape == (10000, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (10000,) and labels.dtype == torch.int64
    # The test split is balanced: 1000 images of each of the 10 classes.
    assert torch.equal(torch.bincount(labels, minlength=10), torch.full((10,), 1000))
    assert images.max() == 255 and images.float().mean() > 50  # real pictures, not an empty buffer


def test_missing_data_error_names_all_three_ways(no_default_dirs: Path, tmp_path: Path) -> None:
    root = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as error:
        data.load_fashion_mnist("train", root=root)
    message = str(error.value)
    assert str(root) in message and str(data.SYSTEM_DIR) in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "download=True" in message
    assert data.ENV_VAR in message


def test_root_is_searched_before_env_var(no_default_dirs: Path, tmp_path: Path, monkeypatch) -> None:
    small = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8)
    write_idx(tmp_path / "root", "test", small, torch.tensor([0, 1, 2, 9, 4]))
    write_idx(tmp_path / "env", "test", small[:3], torch.tensor([3, 3, 3]))
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path / "env"))

    images, labels = data.load_fashion_mnist("test", root=tmp_path / "root")
    assert torch.equal(images, small) and labels.tolist() == [0, 1, 2, 9, 4]
    images, labels = data.load_fashion_mnist("test")  # falls back to the env var
    assert images.shape[0] == 3 and labels.tolist() == [3, 3, 3]


def test_decompressed_files_are_read_too(no_default_dirs: Path, tmp_path: Path) -> None:
    small = torch.randint(0, 256, (2, 28, 28), dtype=torch.uint8)
    write_idx(tmp_path, "train", small, torch.tensor([5, 6]))
    for gz in tmp_path.glob("*.gz"):
        gz.with_suffix("").write_bytes(gzip.decompress(gz.read_bytes()))
        gz.unlink()
    images, _ = data.load_fashion_mnist("train", root=tmp_path)
    assert torch.equal(images, small)


def test_corrupt_files_are_refused(no_default_dirs: Path, tmp_path: Path) -> None:
    small = torch.zeros(4, 28, 28, dtype=torch.uint8)
    write_idx(tmp_path, "test", small, torch.zeros(4, dtype=torch.long))
    image_file = tmp_path / "t10k-images-idx3-ubyte.gz"
    image_file.write_bytes(gzip.compress(gzip.decompress(image_file.read_bytes())[:-10]))
    with pytest.raises(ValueError, match="truncated"):
        data.load_fashion_mnist("test", root=tmp_path)
    # A labels file where an images file should be: wrong magic number.
    image_file.write_bytes((tmp_path / "t10k-labels-idx1-ubyte.gz").read_bytes())
    with pytest.raises(ValueError, match="magic"):
        data.load_fashion_mnist("test", root=tmp_path)
    with pytest.raises(ValueError, match="split"):
        data.load_fashion_mnist("validation", root=tmp_path)


def test_download_verifies_checksums_and_fills_the_cache(no_default_dirs: Path, tmp_path: Path, monkeypatch) -> None:
    served = tmp_path / "served"
    write_idx(served, "train", torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8), torch.tensor([1, 2, 3]))
    write_idx(served, "test", torch.randint(0, 256, (2, 28, 28), dtype=torch.uint8), torch.tensor([4, 5]))
    requested = []

    def fake_urlopen(url: str, timeout: float) -> io.BytesIO:
        requested.append(url)
        return io.BytesIO((served / url.rsplit("/", 1)[1]).read_bytes())

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    # The official sums do not match the synthetic files: every mirror is tried, then a clear error.
    with pytest.raises(OSError, match="MD5 mismatch"):
        data.load_fashion_mnist("test", download=True)
    assert len(requested) == len(data.RELEASE_URLS)
    assert not list(no_default_dirs.glob("*")), "a failed download must leave no file behind"

    sums = {name: hashlib.md5((served / name).read_bytes()).hexdigest() for name in data.RELEASE_MD5}
    monkeypatch.setattr(data, "RELEASE_MD5", sums)
    images, labels = data.load_fashion_mnist("test", download=True)
    assert images.shape == (2, 28, 28) and labels.tolist() == [4, 5]
    assert requested[-1].startswith(data.RELEASE_URLS[0])
    assert sorted(p.name for p in no_default_dirs.iterdir()) == sorted(sums)


def test_model_space_round_trip_is_exact() -> None:
    # Every code value appears, at every position parity.
    images = torch.arange(256, dtype=torch.uint8).repeat(7 * 28 * 28 // 256 + 1)[: 7 * 28 * 28].view(7, 28, 28)
    x = data.to_model_space(images)
    assert x.shape == (7, 1, 32, 32) and x.dtype == torch.float32
    assert x.min() == -1.0 and x.max() == 1.0
    # The 2-pixel border is the black background.
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert torch.all(x[:, 0, border] == -1.0)
    back = data.from_model_space(x)
    assert back.dtype == torch.uint8 and back.shape == (7, 1, 32, 32)
    assert torch.equal(back[:, 0, 2:30, 2:30], images)
    assert torch.all(back[:, 0, border] == 0)
    # 32x32 inputs are converted without padding, and round-trip as well.
    assert torch.equal(data.from_model_space(data.to_model_space(back)), back)


def test_from_model_space_clamps_and_rounds() -> None:
    x = torch.tensor([-3.0, -1.0, 0.0, 1.0, 7.0, -1.0 + 1.4 / 127.5]).view(1, 1, 1, 6)
    assert data.from_model_space(x).view(-1).tolist() == [0, 0, 128, 255, 255, 1]


def test_to_model_space_refuses_bad_input() -> None:
    with pytest.raises(TypeError):
        data.to_model_space(torch.zeros(1, 28, 28))
    with pytest.raises(ValueError):
        data.to_model_space(torch.zeros(1, 3, 28, 28, dtype=torch.uint8))
    with pytest.raises(ValueError):
        data.to_model_space(torch.zeros(1, 1, 30, 30, dtype=torch.uint8))


def test_class_names() -> None:
    assert len(data.CLASS_NAMES) == data.NUM_CLASSES == 10
    assert data.CLASS_NAMES[0] == "T-shirt/top" and data.CLASS_NAMES[9] == "Ankle boot"
