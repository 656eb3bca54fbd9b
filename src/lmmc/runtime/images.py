"""Pictures as every lmmc reader hands them to an image processor: a file turned upright by its EXIF
orientation, transparency laid over white, RGB; the same pixels whether a user passes a path or a PIL image."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmmc.errors import LmmcError

# Image modes that are not pictures: converting 32-bit integer or float pixels to RGB clips them to garbage.
NOT_PICTURES = {"I", "F", "I;16", "I;16B", "I;16L", "I;16N"}


ORIENTATION = 0x0112  # the EXIF tag
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm",
                  ".pbm", ".pnm", ".ico"}
# Picture formats lmmc does not read (Pillow reads some only with a plugin, or not at all): a folder holding them
# is refused rather than read without them.
OTHER_PICTURES = {".avif", ".avifs", ".heic", ".heif", ".jxl", ".jp2", ".j2k", ".jpx", ".apng", ".qoi", ".dng",
                  ".cr2", ".cr3", ".nef", ".arw", ".orf", ".rw2", ".raw", ".svg", ".psd", ".tga", ".exr", ".hdr"}
READ_FIX = "pass the path of a readable PNG or JPEG picture"  # what a user of lmmc.runtime does about a bad file


def open_image(path: str | Path, fix: str = "remove it or replace it with a PNG/JPEG picture"):
    """The picture in an image file, upright and RGB; `fix` says what to do when it cannot be read."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            # Cameras store portrait shots sideways with an orientation tag; transformers' load_image and
            # browsers turn them upright, so the model must see them that way too.
            upright = ImageOps.exif_transpose(image)
            upright.load()
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as err:
        raise LmmcError(f"cannot read image '{path}': {err}; {fix}") from None
    return to_rgb(upright, str(path))


def to_rgb(image: Any, name: str = "an image"):
    """A PIL image as RGB, transparent pixels over white as CLIP-style processors do it (a plain convert
    would show whatever colour the file stores under them, and ViT-style processors reject anything but three
    channels); an array as the RGB PIL image of the same pixels (`rgb_array`). An image as `Image.open`
    returned it is turned upright by its orientation tag, as open_image turns its file, so a file and the image
    opened from it read alike; any other image is taken as it is, since PIL copies the tag onto the images
    derived from it, one the user already rotated included."""
    from PIL import Image, ImageOps

    if not isinstance(image, Image.Image):
        return rgb_array(image, name)
    try:
        image.load()  # PIL reads pixels lazily: a truncated or closed image fails here, not in the processor
    except (OSError, ValueError, AssertionError, Image.DecompressionBombError) as err:
        why = str(err) or "it was closed"  # a `with Image.open(...)` block closed it: PIL says nothing
        raise LmmcError(f"cannot read {name}: {why}; pass an open, whole image, or its file's path") from None
    if 0 in image.size:
        raise LmmcError(f"{name} is {image.size[0]} x {image.size[1]} pixels: a picture without pixels")
    if image.format is not None and image.getexif().get(ORIENTATION, 1) != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode == "RGB":
        return image
    if image.mode in NOT_PICTURES:
        raise LmmcError(f"{name} has mode {image.mode} (integer or float pixels, e.g. a depth map or a 16-bit "
                        f"scan), not a picture; convert it to 8-bit RGB first")
    if image.mode == "La":  # premultiplied grey, which PIL converts only to its plain form
        image = image.convert("LA")
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255)), rgba).convert("RGB")


def rgb_array(image: Any, name: str = "an image"):
    """One picture given as an array (H x W, H x W x C or C x H x W; C of 1, 3 or 4; values 0-255, as
    transformers' image processors read arrays) as the RGB PIL image of its pixels: grey repeated,
    transparency laid over white. Anything else is refused, never guessed at: a stack of pictures in one
    item would come back as several embeddings, and floats within [0, 1] would be read as nearly black."""
    import numpy as np
    from PIL import Image

    x = as_numpy(image)
    if x.dtype.kind not in "uif":
        raise LmmcError(f"{name} is an array of {x.dtype}; give pixels as numbers 0-255")
    if x.ndim == 3 and x.shape[0] in (1, 3, 4) and x.shape[-1] not in (1, 3, 4):
        x = x.transpose(1, 2, 0)
    if x.ndim == 2:
        x = x[..., None]
    if x.ndim != 3 or x.shape[-1] not in (1, 3, 4):
        raise LmmcError(f"{name} is an array of shape {list(x.shape)}; one picture is H x W, H x W x C or C x H x W "
                        f"with 1, 3 or 4 channels (pass several as a list, a stack of them as list(stack))")
    if 0 in x.shape:
        raise LmmcError(f"{name} is an array of shape {list(x.shape)}: a picture without pixels")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise LmmcError(f"{name} holds NaN or infinite pixels")
    low, high = x.min(), x.max()
    if low < 0 or high > 255:
        raise LmmcError(f"{name} holds pixel values from {low} to {high}; arrays are read on the 0-255 scale, as "
                        f"transformers' image processors read them: scale them to that range")
    if x.dtype.kind == "f" and 0 < high < 2:  # a [0, 1] picture that resizing overshot a little, too
        raise LmmcError(f"{name} holds float pixels within [0, {high:.3g}]; arrays are read on the 0-255 scale, as "
                        f"transformers' image processors read them, so this picture would be read as nearly "
                        f"black: multiply it by 255")
    # Through PIL as 8-bit pixels: image processors that resize with PIL refuse floats with fractions. And
    # handed on as a PIL image: given an array, a processor guesses its channel axis, and takes a picture 1, 3
    # or 4 pixels high for channels first.
    x = np.rint(x).astype(np.uint8)
    return to_rgb(Image.fromarray(x[..., 0] if x.shape[-1] == 1 else x), name)


def as_numpy(value: Any):
    """An array of `value`; a torch tensor is detached and moved to the CPU first (one that requires grad, or
    lives on a GPU, has no numpy view), and bf16, which numpy lacks, widened to fp32."""
    import numpy as np

    if hasattr(value, "detach") and hasattr(value, "cpu"):
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
    return np.asarray(value)
