"""Image grids (PNG) for judging samples by eye."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from dqcompile.fmnist.data import from_model_space

__all__ = ["image_grid", "save_image_grid"]


def image_grid(images: torch.Tensor, rows: int, padding: int = 2) -> Image.Image:
    """Images [N, 1, H, W] (N = rows x columns, row-major) -> one grayscale PIL image.

    ``images`` are uint8, or float in model space ([-1, 1], converted with from_model_space). Tiles are
    separated by ``padding`` pixels of mid-grey so that black backgrounds stay distinguishable.
    """
    if images.dim() != 4 or images.shape[1] != 1:
        raise ValueError(f"expected [N, 1, H, W] images, got shape {tuple(images.shape)}")
    if images.is_floating_point():
        images = from_model_space(images)
    elif images.dtype != torch.uint8:
        raise ValueError(f"expected uint8 or float (model space) images, got {images.dtype}")
    count, _, height, width = images.shape
    if count % rows:
        raise ValueError(f"{count} images do not fill {rows} rows")
    columns = count // rows
    canvas = torch.full(
        (rows * (height + padding) + padding, columns * (width + padding) + padding), 128, dtype=torch.uint8
    )
    for index, image in enumerate(images.cpu()):
        top = padding + (index // columns) * (height + padding)
        left = padding + (index % columns) * (width + padding)
        canvas[top : top + height, left : left + width] = image[0]
    return Image.fromarray(canvas.numpy(), mode="L")


def save_image_grid(images: torch.Tensor, rows: int, path: str | Path, scale: int = 2) -> Path:
    """Write ``image_grid(images, rows)`` as a PNG, enlarged ``scale`` times (nearest) for viewing."""
    grid = image_grid(images, rows)
    if scale > 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path
