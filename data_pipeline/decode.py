"""Turn any image file a chest X-ray source ships into grayscale uint8 HxWx1, or a reason why not.

Sources mix 8- and 16-bit PNGs, RGB(A) JPEGs, palette images and the odd corrupt or
non-image file. A build must never die on one bad file: `decode_image` raises `DecodeError`
with a short reason, which the builders record as a counted skip.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

# Extensions considered image files; anything else in a class folder is skipped unread.
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})


class DecodeError(ValueError):
    """A file that cannot become an image; the message is the reason recorded for the skip."""


def to_grayscale(img: Image.Image) -> np.ndarray:
    """Convert a Pillow image of any mode to uint8 HxWx1.

    16-bit and float images are stretched from their own min..max to 0..255 (a fixed /256
    would leave most 12-bit radiographs nearly black); alpha is dropped; palette, CMYK and
    colour images go through Pillow's luminance conversion.
    """
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(img, dtype=np.float64)
        lo, hi = float(values.min()), float(values.max())
        scaled = (values - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(values)
        gray = np.rint(scaled).astype(np.uint8)
    else:
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            img = img.convert("RGBA").convert("RGB")  # drop alpha, keep the colour values
        gray = np.asarray(img.convert("L"), dtype=np.uint8)
    return gray[..., None]


def _decode(data: bytes) -> tuple[np.ndarray, bool]:
    """Decoded uint8 HxWx1 and whether `data` already is an 8-bit grayscale PNG."""
    if not data:
        raise DecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                return to_grayscale(img), (img.format == "PNG" and img.mode == "L")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DecodeError(f"decompression bomb: {e}") from None
    except UnidentifiedImageError:
        raise DecodeError("not an image (Pillow cannot identify it)") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data
        raise DecodeError(f"corrupt image: {e}") from None


def _read(source: str | Path | bytes) -> bytes:
    return Path(source).read_bytes() if isinstance(source, (str, Path)) else source


def decode_image(source: str | Path | bytes) -> np.ndarray:
    """Read a file path or encoded bytes into grayscale uint8 HxWx1.

    Raises DecodeError for zero-byte, non-image, corrupt or truncated files and for
    decompression bombs (more than `PIL.Image.MAX_IMAGE_PIXELS` pixels).
    """
    return _decode(_read(source))[0]


def decode_for_storage(source: str | Path | bytes) -> tuple[np.ndarray, bytes]:
    """Like `decode_image`, plus PNG bytes of the result to store.

    An 8-bit grayscale PNG is stored as is (re-encoding would cost most of the build time
    and change nothing); anything else is re-encoded.
    """
    data = _read(source)
    image, is_gray_png = _decode(data)
    return image, (data if is_gray_png else encode_png(image))


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
