"""Pictures as every lmmc reader hands them to an image processor: a file turned upright by its EXIF
orientation, transparency laid over white, RGB; the same pixels whether a user passes a path or a PIL image."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmmc.errors import LmmcError

# Image modes that are not pictures: converting 32-bit integer or float pixels to RGB clips them to garbage.
NOT_PICTURES = {"I", "F", "I;16", "I;16B", "I;16L", "I;16N"}


def open_image(path: str | Path):
    """The picture in an image file, upright and RGB."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            # Cameras store portrait shots sideways with an orientation tag; transformers' load_image and
            # browsers turn them upright, so the model must see them that way too.
            upright = ImageOps.exif_transpose(image)
            upright.load()
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as err:
        raise LmmcError(f"cannot read image '{path}': {err}") from None
    return to_rgb(upright, str(path))


def to_rgb(image: Any, name: str = "an image"):
    """A PIL image as RGB, transparent pixels over white as CLIP-style processors do it (a plain convert
    would turn them black, and ViT-style processors reject anything but three channels); other inputs
    (arrays) pass through as they are."""
    from PIL import Image

    if not isinstance(image, Image.Image) or image.mode == "RGB":
        return image
    if image.mode in NOT_PICTURES:
        raise LmmcError(f"{name} has mode {image.mode} (integer or float pixels, e.g. a depth map or a 16-bit "
                        f"scan), not a picture; convert it to 8-bit RGB first")
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255)), rgba).convert("RGB")
