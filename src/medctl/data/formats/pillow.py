"""PNG, TIFF, JPEG and BMP through Pillow: a multi-page TIFF is a volume."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medctl.data.image import Format, Image, ImageHeader, default_direction


def read_pillow(path: Path) -> Image:
    """PNG/TIFF/JPEG/BMP: grayscale -> (1, H, W), RGB(A) -> (3, H, W), multi-page TIFF -> (C, D, H, W)."""
    from PIL import Image as PILImage

    with PILImage.open(path) as img:
        frames = []
        for index in range(getattr(img, "n_frames", 1)):
            img.seek(index)
            frames.append(_pillow_array(img))
    if len(frames) == 1:
        pixels = frames[0]  # (H, W) or (H, W, 3)
        array = np.moveaxis(pixels, -1, 0) if pixels.ndim == 3 else pixels[None]
        return Image(np.ascontiguousarray(array), (1.0, 1.0), (0.0, 0.0), default_direction(2))
    volume = np.stack(frames, axis=0)  # (D, H, W) or (D, H, W, 3)
    array = np.moveaxis(volume, -1, 0) if volume.ndim == 4 else volume[None]
    return Image(np.ascontiguousarray(array), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), default_direction(3))


def _pillow_array(img) -> np.ndarray:
    if img.mode in ("RGBA", "LA", "P", "CMYK", "YCbCr", "HSV"):
        img = img.convert("RGB" if img.mode != "LA" else "L")
    return np.asarray(img)


def read_pillow_header(paths: Sequence[Path]) -> ImageHeader:
    from PIL import Image as PILImage

    with PILImage.open(paths[0]) as img:
        return ImageHeader((getattr(img, "n_frames", 1), img.height, img.width), img.mode)


FORMAT = Format(
    "pillow",
    "image",
    (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp"),
    read=lambda paths: read_pillow(paths[0]),
    read_header=read_pillow_header,
)
