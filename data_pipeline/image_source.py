"""What every decoder shares, and imports nothing else of the package: reading a file's
bytes, the pixel budget, the error a skipped file is reported with, the error the user's data
is refused with (`DataError`), and which file names are images.

`data_pipeline.decode` (Pillow, and DICOM through `data_pipeline.dicom`) and
`data_pipeline.dicom` both build on this module, so the dependency runs one way:
decode -> dicom -> image_source. `decode` re-exports every name here.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

# DICOM file names; a DICOM file named otherwise is recognised by its content
# (`data_pipeline.dicom.is_dicom`).
DICOM_EXTENSIONS: frozenset[str] = frozenset({".dcm", ".dicom"})
# Extensions considered image files; other files in a class folder are read only when their
# content says DICOM, else skipped.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}) | DICOM_EXTENSIONS

DEFAULT_MAX_PIXELS = 50_000_000
MAX_PIXELS_ENV = "CXR_ENSEMBLES_MAX_PIXELS"


class DecodeError(ValueError):
    """A file that cannot become an image; the message is the reason recorded for the skip."""


class DataError(ValueError):
    """The user's data refused: a bad data folder or manifest, an unknown layout, unknown or
    repeated class names, an empty dataset, a quality setting that cannot filter, a split the
    data cannot satisfy. The message is one line for `error: ...`."""


def pixel_budget(max_pixels: int | None = None) -> int:
    """The largest width x height decoded: `max_pixels`, else `$CXR_ENSEMBLES_MAX_PIXELS`,
    else 50 MP. DataError for a value that is not a positive integer."""
    if max_pixels is None:
        text = os.environ.get(MAX_PIXELS_ENV, "").strip()
        if not text:
            return DEFAULT_MAX_PIXELS
        try:
            max_pixels = int(text)
        except ValueError:
            raise DataError(f"${MAX_PIXELS_ENV} must be a positive integer, got {text!r}"
                            ) from None
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise DataError(f"max_pixels must be a positive integer, got {max_pixels!r}")
    return max_pixels


def read_source(source: str | Path | bytes) -> bytes:
    """The bytes of a path (a regular file: a FIFO or device is never opened) or `source`."""
    if not isinstance(source, (str, Path)):
        return source
    path = Path(source)
    try:
        mode = path.stat().st_mode
        if not stat.S_ISREG(mode):
            raise DecodeError(f"not a regular file ({file_kind(mode)})")
        return path.read_bytes()
    except OSError as e:
        raise DecodeError(f"cannot read: {e.strerror or e}") from None


def file_kind(mode: int) -> str:
    """'folder', 'FIFO', 'socket', 'device' or 'file' for an `os.stat` mode."""
    if stat.S_ISDIR(mode):
        return "folder"
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    return "file"
