"""Decoding a source image, the one way every consumer does it (objloader-build, ContraCAM): one
decode, EXIF orientation applied (images are used as displayed), alpha, CMYK, grey and high
bit-depth images made RGB, and unusable input refused with a reason (SkipRecord)."""
from __future__ import annotations

import io
import threading
import warnings
from dataclasses import dataclass
from typing import Tuple

import numpy as np
from PIL import Image, ImageOps

__all__ = ["SkipRecord", "DecodeLimits", "decode_image"]


@dataclass(frozen=True)
class DecodeLimits:
    """What decode_image refuses or reduces; objloader-build's BuildOptions takes its defaults
    from here."""

    max_pixels: int = 1 << 28  # decompression bombs
    min_size: int = 8
    max_res: int = 256


# Fill colour for transparent pixels: mid-grey keeps them away from both black and white.
ALPHA_FILL = (128, 128, 128)

# The EXIF (TIFF) tag of an image's orientation; values 5-8 turn it by 90 degrees.
EXIF_ORIENTATION = 0x0112


_PIL_LIMIT = threading.Lock()


def _let_pil_open(max_pixels: int) -> None:
    """PIL refuses images above its own limit (Image.MAX_IMAGE_PIXELS, ~89 MP) while opening
    them, before --max-pixels is looked at. The limit is process-wide, so it is only ever raised
    (another caller in the process may allow more), under a lock; decode_image then applies its
    caller's own max_pixels exactly, and --max-pixels alone decides."""
    with _PIL_LIMIT:
        if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
            Image.MAX_IMAGE_PIXELS = max_pixels


class SkipRecord(Exception):
    """An input that cannot become a record; the message is the reason kept in the manifest."""


def decode_image(data: bytes, opts: DecodeLimits) -> Tuple[np.ndarray, Tuple[int, int], list]:
    """RGB uint8 [h, w, 3] (already reduced towards max_res for large JPEGs), the source's
    (height, width) and the conversions applied. Raises SkipRecord for unusable input.
    ``opts``: any object with the fields of DecodeLimits (objloader-build's BuildOptions has them)."""
    notes = []
    _let_pil_open(opts.max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            src_w, src_h = im.size
            if src_w * src_h > opts.max_pixels:
                raise SkipRecord(f"too large: {src_w}x{src_h} pixels exceeds --max-pixels {opts.max_pixels}")
            if min(src_w, src_h) < opts.min_size:
                raise SkipRecord(f"too small: {src_w}x{src_h}, a side is below --min-size {opts.min_size}")
            if im.format == "JPEG" and max(src_w, src_h) > 2 * opts.max_res:
                # Let libjpeg decode at 1/2, 1/4 or 1/8 scale: huge photos cost a fraction of a full decode.
                scale = opts.max_res / max(src_w, src_h)
                im.draft(im.mode, (max(1, int(src_w * scale)), max(1, int(src_h * scale))))
            im.load()  # truncated or corrupt data fails here, not later in a loader
    except SkipRecord:
        raise
    except Image.UnidentifiedImageError:
        raise SkipRecord("not an image file (format not recognised)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # PIL's limit is at least max_pixels here, so PIL refusing means above --max-pixels too.
        raise SkipRecord(f"too large: exceeds --max-pixels {opts.max_pixels} ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise SkipRecord(f"cannot decode image: {e}") from None
    orientation = _exif_orientation(im)
    if orientation in range(2, 9):
        # Images are used as displayed (sources/imagefolder.py): masks are drawn on the turned image.
        im = ImageOps.exif_transpose(im)
        notes.append("EXIF orientation applied")
        if orientation >= 5:
            src_w, src_h = src_h, src_w
    mode = im.mode
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, ALPHA_FILL + (255,))
        im = Image.alpha_composite(canvas, rgba)
        notes.append("alpha composited on grey")
    elif mode == "CMYK":
        notes.append("CMYK converted to RGB")
    elif mode in ("L", "1", "I", "I;16", "I;16B", "I;16L", "F"):
        if mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            # High bit-depth grey: rescale to 8 bits instead of clipping.
            a = np.asarray(im, dtype=np.float64)
            hi = a.max() if a.max() > 0 else 1.0
            im = Image.fromarray(np.clip(a * (255.0 / hi), 0, 255).astype(np.uint8))
        notes.append("grayscale converted to RGB")
    elif mode not in ("RGB", "P", "YCbCr"):
        notes.append(f"{mode} converted to RGB")
    rgb = np.asarray(im.convert("RGB"))
    return np.ascontiguousarray(rgb), (src_h, src_w), notes


def _exif_orientation(im: Image.Image) -> int:
    """The EXIF orientation (1-8) of a decoded image, 1 when it has none or it cannot be read."""
    try:
        return int(im.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:  # a damaged EXIF block says nothing about the pixels, which decoded fine
        return 1
