"""Fashion-MNIST: finding and reading the raw release files, and the model's pixel space.

The embedded default model (dqcompile.fmnist.dit) is trained on Fashion-MNIST padded from 28x28 to
32x32 so that patch size 2 gives 256 tokens, the token count of DiT-XL/2 at 256 px. The data is read
from the four official gzip'd IDX files, found in this order:

1. the ``root`` argument,
2. the directory in the environment variable ``DQCOMPILE_FMNIST``,
3. ``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist`` package),
4. the download cache (``$XDG_CACHE_HOME/dqcompile/fashion-mnist``), filled by ``download=True``.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "CLASS_NAMES",
    "NUM_CLASSES",
    "IMAGE_SIZE",
    "MODEL_IMAGE_SIZE",
    "ENV_VAR",
    "SYSTEM_DIR",
    "load_fashion_mnist",
    "find_fashion_mnist",
    "download_fashion_mnist",
    "default_cache_dir",
    "to_model_space",
    "from_model_space",
]

CLASS_NAMES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
NUM_CLASSES = len(CLASS_NAMES)
IMAGE_SIZE = 28
MODEL_IMAGE_SIZE = 32
# Fashion-MNIST garments lie on a black background; padding with it keeps the border in-distribution.
BACKGROUND_VALUE = 0

ENV_VAR = "DQCOMPILE_FMNIST"
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")

# The release files and their MD5 sums as published by Zalando Research
# (https://github.com/zalandoresearch/fashion-mnist#get-the-data).
RELEASE_URLS: tuple[str, ...] = (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
)
RELEASE_MD5: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
_SPLIT_PREFIX = {"train": "train", "test": "t10k"}
_IDX_MAGIC = {"images": 0x00000803, "labels": 0x00000801}


def _split_files(split: str) -> tuple[str, str]:
    """The (images, labels) release file names of a split."""
    if split not in _SPLIT_PREFIX:
        raise ValueError(f"split must be one of {sorted(_SPLIT_PREFIX)}, got {split!r}")
    prefix = _SPLIT_PREFIX[split]
    return f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-labels-idx1-ubyte.gz"


def default_cache_dir() -> Path:
    """Where ``download=True`` puts the release files: ``$XDG_CACHE_HOME/dqcompile/fashion-mnist``."""
    cache_home = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache_home) / "dqcompile" / "fashion-mnist"


def _existing_file(directory: Path, name: str) -> Path | None:
    """The gzip'd file, or the same file already decompressed (``name`` without ``.gz``), if present."""
    for candidate in (directory / name, directory / name.removesuffix(".gz")):
        if candidate.is_file():
            return candidate
    return None


def _search_dirs(root: str | Path | None) -> list[Path]:
    """The directories searched, in order."""
    dirs = []
    if root is not None:
        dirs.append(Path(root))
    if os.environ.get(ENV_VAR):
        dirs.append(Path(os.environ[ENV_VAR]))
    dirs.append(SYSTEM_DIR)
    dirs.append(default_cache_dir())
    return dirs


def find_fashion_mnist(split: str = "train", root: str | Path | None = None) -> tuple[Path, Path] | None:
    """The (images, labels) file paths of ``split`` from the first directory that has both, or None."""
    image_name, label_name = _split_files(split)
    for directory in _search_dirs(root):
        images, labels = _existing_file(directory, image_name), _existing_file(directory, label_name)
        if images is not None and labels is not None:
            return images, labels
    return None


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_fashion_mnist(directory: str | Path | None = None) -> Path:
    """Fetch the four official release files into ``directory`` (default: the cache dir); verify MD5.

    Files already there with the right checksum are kept. Returns the directory.
    """
    target = Path(directory) if directory is not None else default_cache_dir()
    target.mkdir(parents=True, exist_ok=True)
    for name, expected_md5 in RELEASE_MD5.items():
        destination = target / name
        if destination.is_file() and _md5(destination) == expected_md5:
            continue
        errors = []
        for base_url in RELEASE_URLS:
            # Download to a temporary name first so that an interrupted download never looks complete.
            with tempfile.NamedTemporaryFile(dir=target, delete=False, suffix=".part") as partial:
                partial_path = Path(partial.name)
            try:
                with urllib.request.urlopen(base_url + name, timeout=60) as response, partial_path.open("wb") as out:
                    shutil.copyfileobj(response, out)
                actual_md5 = _md5(partial_path)
                if actual_md5 != expected_md5:
                    raise OSError(f"MD5 mismatch: got {actual_md5}, expected {expected_md5}")
                partial_path.replace(destination)
                break
            except OSError as error:  # URLError and HTTPError are OSErrors
                errors.append(f"{base_url + name}: {error}")
            finally:
                partial_path.unlink(missing_ok=True)
        else:
            raise OSError("could not download Fashion-MNIST file " + name + ":\n  " + "\n  ".join(errors))
    return target


def _read_idx(path: Path, kind: str) -> np.ndarray:
    """Parse an IDX file (optionally gzip'd) of unsigned bytes; check its magic number."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    magic = int.from_bytes(raw[0:4], "big")
    if magic != _IDX_MAGIC[kind]:
        raise ValueError(f"{path}: not an IDX {kind} file (magic {magic:#010x}, expected {_IDX_MAGIC[kind]:#010x})")
    ndim = magic & 0xFF
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape} but holds {data.size} values (truncated file?)")
    return data.reshape(shape)


def load_fashion_mnist(
    split: str = "train", root: str | Path | None = None, download: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a Fashion-MNIST split.

    Args:
        split: "train" (60000 images) or "test" (10000 images).
        root: a directory holding the release files; searched first.
        download: fetch the official release files into the cache dir when no directory has them.

    Returns:
        images: uint8 [N, 28, 28]; labels: int64 [N] in [0, 9].

    Raises:
        FileNotFoundError: when no searched directory has the files and ``download`` is False.
    """
    found = find_fashion_mnist(split, root)
    if found is None and download:
        download_fashion_mnist(default_cache_dir())
        found = find_fashion_mnist(split, root)
    if found is None:
        image_name, label_name = _split_files(split)
        searched = "\n".join(f"  - {directory}" for directory in _search_dirs(root))
        raise FileNotFoundError(
            f"Fashion-MNIST {split!r} split not found ({image_name}, {label_name}). Searched:\n{searched}\n"
            "Provide it in one of three ways:\n"
            f"  1. pass root=DIR (or set {ENV_VAR}=DIR) for a directory holding the four release .gz files;\n"
            "  2. on Debian/Ubuntu: apt-get install dataset-fashion-mnist (installs them in "
            f"{SYSTEM_DIR});\n"
            "  3. call load_fashion_mnist(..., download=True) to fetch the official Zalando release "
            f"into {default_cache_dir()}."
        )
    image_path, label_path = found
    images = _read_idx(image_path, "images")
    labels = _read_idx(label_path, "labels")
    if images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE) or images.shape[0] != labels.shape[0]:
        raise ValueError(f"unexpected Fashion-MNIST shapes: images {images.shape}, labels {labels.shape}")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def to_model_space(images: torch.Tensor) -> torch.Tensor:
    """uint8 images [N, 28, 28], [N, 1, 28, 28] or [N, 1, 32, 32] -> float32 [N, 1, 32, 32] in [-1, 1].

    28x28 images are padded by 2 pixels on each side with the black background (-1 in model space).
    """
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {images.dtype}")
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if images.dim() != 4 or images.shape[1] != 1:
        raise ValueError(f"expected [N, 28, 28] or [N, 1, H, W] images, got shape {tuple(images.shape)}")
    height, width = images.shape[-2:]
    if (height, width) == (IMAGE_SIZE, IMAGE_SIZE):
        pad = (MODEL_IMAGE_SIZE - IMAGE_SIZE) // 2
        images = torch.nn.functional.pad(images, (pad, pad, pad, pad), value=BACKGROUND_VALUE)
    elif (height, width) != (MODEL_IMAGE_SIZE, MODEL_IMAGE_SIZE):
        raise ValueError(f"expected 28x28 or 32x32 images, got {height}x{width}")
    return images.float() / 127.5 - 1.0


def from_model_space(x: torch.Tensor) -> torch.Tensor:
    """float [N, 1, 32, 32] model-space images -> uint8 [N, 1, 32, 32]; values outside [-1, 1] are clamped.

    The exact inverse of :func:`to_model_space` on its outputs (rounding to the nearest code).
    """
    return ((x.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
