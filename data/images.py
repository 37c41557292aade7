"""Reading images the way training and the BLIP processor see them, and checking they decode."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from data.errors import DataFormatError

# Modes holding more than 8 bits per pixel; convert("RGB") clips them (16-bit PNG -> white).
WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB, transparency composited onto white, 16-bit grey scaled (not clipped) to 8 bits."""
    if image.mode in WIDE_MODES:
        grey = np.asarray(image, dtype=np.float64) / 257.0  # 65535 -> 255
        return Image.fromarray(np.clip(grey + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    # Same as transformers.image_transforms.convert_to_rgb, so training sees the pixels
    # the BLIP processor would produce from the same file at inference.
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path: Path) -> Image.Image:
    """Read and fully decode an image as RGB, EXIF orientation applied (as viewers and
    transformers.image_utils.load_image do); DataFormatError if unreadable."""
    try:
        with Image.open(path) as image:
            image.load()  # decodes every pixel: a truncated file fails here, not mid-training
            return _to_rgb(ImageOps.exif_transpose(image))
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... on corrupt files
        raise DataFormatError(f"{path}: cannot read image ({type(e).__name__}: {e})") from e


def image_problem(path: Path, decode: bool) -> str | None:
    """Why the image at path is unusable, or None; decode reads it exactly as training will."""
    try:
        if not path.is_file():
            return f"is not a file ({path})" if path.exists() else f"not found (looked for {path})"
    except OSError as e:  # a symlink loop, a path too long
        return f"cannot be opened ({e.strerror or e}: {path})"
    if decode:
        try:
            with Image.open(path) as image:
                image.load()
                ImageOps.exif_transpose(image)
        except Exception as e:  # PIL raises OSError, SyntaxError, struct.error... when corrupt
            return f"cannot be read ({type(e).__name__}: {e})"
    return None
