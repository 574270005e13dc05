"""Turn any image file a chest X-ray source ships into grayscale uint8 HxWx1, or a reason why not.

Sources mix 8- and 16-bit PNGs, RGB(A) JPEGs, palette images, DICOM files (read by
`data_pipeline.dicom`) and the odd corrupt or non-image file. A build must never die on one bad file: `decode_image` raises `DecodeError`
with a short reason, which the builders record as a counted skip.

Memory stays bounded whatever a file claims: the pixel count is checked from the header
before anything is decoded (`pixel_budget`, default 50 MP, `$CXR_ENSEMBLES_MAX_PIXELS`), and
images with a side over `MAX_SIDE` are downscaled by an integer factor while decoding (JPEG
through Pillow's `draft`, DCT scaling; others by `Image.reduce`, a box filter) before any
conversion, so no full-size float copy is ever made (DICOM's LUTs work on one float copy,
within the same budget). Build and predict decode alike.

The names every decoder shares (`DecodeError`, `pixel_budget`, `read_source`, `file_kind`,
the extension sets) live in `data_pipeline.image_source`, which `dicom` imports too, and are
re-exported here: imports run one way, decode -> dicom -> image_source.
"""

from __future__ import annotations

import io
import math
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from data_pipeline import dicom

# Re-exported: callers import these from here (one definition, in the leaf module that
# `dicom` builds on too).
from data_pipeline.image_source import (  # noqa: F401
    DICOM_EXTENSIONS,
    IMAGE_EXTENSIONS,
    MAX_PIXELS_ENV,
    DecodeError,
    file_kind,
    pixel_budget,
    read_source,
)

# Longest side kept at decode time; larger images shrink by the smallest integer factor that
# brings them to or under it. Real chest X-rays are at most ~4,300 px a side, and every model
# sees a few hundred pixels.
MAX_SIDE = 4096
_REDUCIBLE = frozenset({"L", "LA", "I", "F", "RGB", "RGBA", "CMYK", "YCbCr"})


def to_grayscale(img: Image.Image) -> np.ndarray:
    """Convert a Pillow image of any mode to uint8 HxWx1.

    16-bit and float images are stretched from their own min..max to 0..255 (a fixed /256
    would leave most 12-bit radiographs nearly black); alpha is dropped; palette, CMYK and
    colour images go through Pillow's luminance conversion.
    """
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(img, dtype=np.float64)
        lo, hi = float(values.min()), float(values.max())
        if hi > lo:  # in place: one float copy of the image at a time
            values -= lo
            values *= 255.0 / (hi - lo)
            np.rint(values, out=values)
        else:
            values[:] = 0
        gray = values.astype(np.uint8)
    else:
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            img = img.convert("RGBA").convert("RGB")  # drop alpha, keep the colour values
        gray = np.asarray(img.convert("L"), dtype=np.uint8)
    return gray[..., None]


def _shrink(img: Image.Image, factor: int) -> Image.Image:
    """`img` reduced by `factor` (box filter) in a mode `to_grayscale` reads alike."""
    if img.mode not in _REDUCIBLE:
        if img.mode.startswith("I;16"):
            img = img.convert("I")
        elif img.mode in ("PA", "P") and (img.mode == "PA" or "transparency" in img.info):
            img = img.convert("RGBA")
        else:
            img = img.convert("L")
    return img.reduce(factor)


def _decode(data: bytes, max_pixels: int | None = None) -> tuple[np.ndarray, bool]:
    """Decoded uint8 HxWx1 and whether `data` already is that image as an 8-bit gray PNG."""
    if not data:
        raise DecodeError("empty file (0 bytes)")
    budget = pixel_budget(max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:  # reads the header only
                w, h = img.size
                if w * h > budget:
                    raise DecodeError(
                        f"too large: {w}x{h} = {w * h / 1e6:.1f} MP exceeds the pixel budget "
                        f"of {budget / 1e6:g} MP (${MAX_PIXELS_ENV})")
                factor = math.ceil(max(w, h) / MAX_SIDE)
                if factor > 1 and img.format == "JPEG":
                    img.draft(None, (math.ceil(w / factor), math.ceil(h / factor)))
                img.load()
                factor = math.ceil(max(img.size) / MAX_SIDE)
                shrunk = _shrink(img, factor) if factor > 1 else img
                as_is = (img.format == "PNG" and img.mode == "L" and img.size == (w, h)
                         and shrunk is img)
                return to_grayscale(shrunk), as_is
    except DecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DecodeError(f"decompression bomb: {e}") from None
    except UnidentifiedImageError:
        raise DecodeError("not an image (Pillow cannot identify it)") from None
    except MemoryError:
        raise DecodeError("out of memory while decoding") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # truncated or corrupt data
        raise DecodeError(f"corrupt image: {e}") from None


def decode_image(source: str | Path | bytes, *, max_pixels: int | None = None,
                 skip_lateral: bool = True) -> np.ndarray:
    """Read a file path or encoded bytes into grayscale uint8 HxWx1.

    DICOM (by content, or a `.dcm` / `.dicom` path) goes through `data_pipeline.dicom`
    (`skip_lateral`: refuse lateral views); anything else through Pillow.
    Raises DecodeError for unreadable, non-regular, zero-byte, non-image, corrupt or truncated
    files, for images over the pixel budget (`pixel_budget(max_pixels)`, checked from the
    header) and for decompression bombs (more than `PIL.Image.MAX_IMAGE_PIXELS` pixels).
    Images with a side over `MAX_SIDE` come back downscaled by an integer factor.
    """
    data = read_source(source)
    dicom_image = _decode_dicom(source, data, max_pixels, skip_lateral)
    return dicom_image if dicom_image is not None else _decode(data, max_pixels)[0]


def decode_for_storage(source: str | Path | bytes, *, max_pixels: int | None = None,
                       skip_lateral: bool = True) -> tuple[np.ndarray, bytes]:
    """Like `decode_image`, plus PNG bytes of the result to store.

    An 8-bit grayscale PNG kept at full size is stored as is (re-encoding would cost most of
    the build time and change nothing); anything else is re-encoded.
    """
    data = read_source(source)
    dicom_image = _decode_dicom(source, data, max_pixels, skip_lateral)
    if dicom_image is not None:
        return dicom_image, encode_png(dicom_image)
    image, is_gray_png = _decode(data, max_pixels)
    return image, (data if is_gray_png else encode_png(image))


def _decode_dicom(source: str | Path | bytes, data: bytes, max_pixels: int | None,
                  skip_lateral: bool) -> np.ndarray | None:
    """uint8 HxWx1 of DICOM `data` (shrunk like any image over `MAX_SIDE`), or None when
    `data` is not DICOM by content and `source` is no `.dcm` / `.dicom` path."""
    named = isinstance(source, (str, Path)) and Path(source).suffix.lower() in DICOM_EXTENSIONS
    if not data or not (named or dicom.has_preamble(data)):
        return None
    gray, _ = dicom.read_dicom(data, max_pixels=max_pixels, skip_lateral=skip_lateral)
    factor = math.ceil(max(gray.shape) / MAX_SIDE)
    if factor > 1:
        gray = np.asarray(Image.fromarray(gray).reduce(factor))
    return gray[..., None]


def decode_mask(source: str | Path | bytes, size: tuple[int, int]) -> np.ndarray:
    """Read a lung mask as uint8 HxWx1 in {0, 255}, resized to `size` (H, W) by nearest neighbour.

    Kaggle's masks are 256x256 while its images are 299x299; nearest neighbour keeps the
    mask binary.
    """
    gray = decode_image(source)[..., 0]
    if gray.shape != tuple(size):
        gray = np.asarray(Image.fromarray(gray).resize((size[1], size[0]), Image.Resampling.NEAREST))
    return np.where(gray > 127, 255, 0).astype(np.uint8)[..., None]


def encode_png(image: np.ndarray) -> bytes:
    """Encode uint8 HxWx1 as PNG bytes with Pillow, so TFDS needs no TensorFlow to store it."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 1:
        raise ValueError(f"expected uint8 HxWx1, got {image.dtype} {image.shape}")
    buffer = io.BytesIO()
    Image.fromarray(image[..., 0]).save(buffer, format="PNG", compress_level=1)  # fast
    return buffer.getvalue()
