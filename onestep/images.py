"""One image reader for training data (data.ImageFolder) and onestep-eval (eval/sources.py).

`open_image(path, channels)` decodes a file completely and returns an 8-bit `L` (channels 1) or `RGB`
image (any other channel count) that keeps what the file shows:

- 16-bit integer images (PIL modes `I;16`, `I;16L`, `I;16B`, `I;16N`) are scaled by their full range,
  value * 255 / 65535, rounded to the nearest integer (PIL's own convert("L") clips them at 255 instead).
- 32-bit integer images (mode `I`, which is also how some decoders open 16-bit PNGs and TIFFs) are taken
  as 16-bit when every value lies in 0..65535, and otherwise scaled from the signed 32-bit range,
  (value + 2**31) * 255 / (2**32 - 1). Float images (mode `F`) are taken as 0..255 and clipped, as PIL does.
- Images with transparency (an alpha band, premultiplied alpha, or a transparent palette or colour in
  the file's `transparency` entry) are composited over a white background, so a drawing made only in
  the alpha channel shows (black on white) instead of loading as a solid black image.
- Decoding is complete (`Image.load()`, not `Image.verify()`), so a truncated JPEG or PNG fails here;
  any failure becomes one UserError: "Cannot read image PATH (reason); remove or replace the file."
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from .errors import UserError

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def _reason(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:  # "No such file or directory", without the path again
        text = err.strerror
    else:
        text = str(err).splitlines()[0][:120] if str(err).strip() else ""
    return f"{err.__class__.__name__}: {text}" if text else err.__class__.__name__


def decode(path: str) -> Image.Image:
    """The file's image as PIL decodes it (its own mode), fully loaded; one UserError if it cannot be."""
    try:
        with Image.open(path) as img:
            img.load()  # the whole file: truncation surfaces here, not in a DataLoader worker later
            return img.copy()  # keeps img.info (the transparency entry)
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, struct.error, EOFError, ...
        raise UserError(f"Cannot read image {path} ({_reason(err)}); remove or replace the file.") from None


def _integer_to_8bit(img: Image.Image) -> tuple[Image.Image, np.ndarray | None]:
    """A 16/32-bit integer image as 8-bit L by its full range (module docstring), and its transparency
    mask (1 opaque, 0 transparent) when the file names a transparent value."""
    raw = np.asarray(img)
    values = raw.astype(np.float64)
    if img.mode in SIXTEEN_BIT_MODES or (raw.size and values.min() >= 0 and values.max() <= 65535):
        scaled = values * 255.0 / 65535.0
    else:
        scaled = (values + 2.0**31) * 255.0 / (2.0**32 - 1)
    grey = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")
    transparent = img.info.get("transparency")
    alpha = (raw != transparent).astype(np.float64) if isinstance(transparent, int) else None
    return grey, alpha


def _over_white(rgb: np.ndarray, alpha: np.ndarray) -> Image.Image:
    """Composite colour (H, W, 3) with alpha in 0..1 (H, W) over white."""
    out = rgb.astype(np.float64) * alpha[..., None] + 255.0 * (1.0 - alpha[..., None])
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), "RGB")


def to_8bit(img: Image.Image, channels: int = 3) -> Image.Image:
    """Any decoded PIL image as 8-bit `L` (channels 1) or `RGB` (otherwise): see the module docstring."""
    target = "L" if channels == 1 else "RGB"
    if img.mode in SIXTEEN_BIT_MODES or img.mode == "I":
        grey, alpha = _integer_to_8bit(img)
        if alpha is not None:
            grey = _over_white(np.asarray(grey.convert("RGB")), alpha)
        return grey.convert(target)
    if img.mode == "F":
        grey = Image.fromarray(np.clip(np.rint(np.asarray(img, dtype=np.float64)), 0, 255).astype(np.uint8), "L")
        return grey.convert(target)
    if img.mode in ALPHA_MODES or "transparency" in img.info:
        rgba = np.asarray(img.convert("RGBA"))  # un-premultiplies RGBa/La, resolves palette transparency
        composite = _over_white(rgba[..., :3], rgba[..., 3].astype(np.float64) / 255.0)
        return composite.convert(target)  # an RGB grey converts back to exactly the same L values
    return img.convert(target)


def open_image(path: str, channels: int = 3) -> Image.Image:
    """The image at `path`, fully decoded, as 8-bit `L` (channels 1) or `RGB` (otherwise); 16/32-bit
    images scaled by their full range and transparency composited over white (module docstring). A
    file that cannot be decoded raises UserError: "Cannot read image PATH (...); remove or replace the file.\""""
    img = decode(path)
    try:
        return to_8bit(img, channels)
    except Exception as err:  # an unusual mode PIL cannot convert: as unreadable as a broken file
        raise UserError(f"Cannot read image {path} ({_reason(err)}); remove or replace the file.") from None


def image_size(path: str) -> tuple[int, int]:
    """(width, height) from the file's header only (cheap: for size checks before anything is decoded);
    a file PIL cannot identify raises the same UserError as open_image."""
    try:
        with Image.open(path) as img:
            return img.size
    except Exception as err:
        raise UserError(f"Cannot read image {path} ({_reason(err)}); remove or replace the file.") from None
