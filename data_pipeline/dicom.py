"""Read a DICOM chest radiograph into grayscale uint8, or refuse it with a one-line reason.

The conversion to 8 bits, in this order, with pydicom's own helpers (`pydicom.pixels`):

1. the stored values (decoded by pydicom; compressed transfer syntaxes through the pylibjpeg
   plugins: JPEG baseline / extended / lossless, JPEG-LS, JPEG 2000, RLE);
2. the modality LUT (`apply_modality_lut`: Modality LUT Sequence, else Rescale Slope /
   Intercept);
3. the VOI transform, the first one where several are given: a VOI LUT Sequence
   (`apply_voi`, preferred, as `apply_voi_lut` does), else Window Center / Width
   (`apply_windowing`, with the file's VOI LUT Function);
4. MONOCHROME1 inversion (low values are white there): v -> lo + hi - v over the range below;
5. linear scaling of the range [lo, hi] to 0..255 (rounded): with a window, [lo, hi] is the
   window's output range (values at or below the window's lower edge become 0, at or above
   its upper edge 255); with a VOI LUT, the LUT's smallest..largest entry; with neither, the
   image's own min..max (min-max scaling, as `decode.to_grayscale` does for 16-bit images).

Refused (`DecodeError`, the reason a build or predict records as a counted skip): objects
without pixel data (structured reports, presentation states; an image object whose pixel data
is missing is reported as truncated), colour images (SamplesPerPixel != 1 or a photometric
interpretation other than MONOCHROME1/2), multi-frame images, lateral views (ViewPosition
LL, RL, LAT, LATERAL) with `skip_lateral`, images over the pixel budget (Rows x Columns,
checked before the pixel data is decoded), transfer syntaxes without an installed decoder
(naming the missing plugin) and truncated or otherwise undecodable pixel data.

Lateral views are skipped by default: every model here is trained on frontal (PA/AP) views,
and a lateral fed to it gets a confident but meaningless answer. A file without ViewPosition
is read.

The conversion works on one float64 copy of the image (8 bytes a pixel; the pixel budget
bounds it); `decode.decode_image` then shrinks images over `decode.MAX_SIDE` like any other.
"""

from __future__ import annotations

import io
import stat
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing, get_decoder
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from data_pipeline.image_source import (
    DICOM_EXTENSIONS,
    MAX_PIXELS_ENV,
    DecodeError,
    pixel_budget,
    read_source,
)

PREAMBLE = 128  # bytes before the "DICM" magic of a DICOM Part 10 file
MAGIC = b"DICM"
LATERAL_VIEWS: frozenset[str] = frozenset({"LL", "RL", "LAT", "LATERAL"})
_GRAYSCALE = ("MONOCHROME1", "MONOCHROME2")


def has_preamble(data: bytes) -> bool:
    """Whether `data` starts like a DICOM Part 10 file: a 128-byte preamble, then "DICM"."""
    return data[PREAMBLE:PREAMBLE + len(MAGIC)] == MAGIC


def is_dicom(source: str | Path | bytes) -> bool:
    """Whether `source` (bytes, or a path) is DICOM: a `.dcm` / `.dicom` name, or the
    preamble + "DICM" at the start of the content. Only a regular file is opened (a FIFO
    would block); one that cannot be read is not DICOM."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return has_preamble(bytes(source))
    path = Path(source)
    if path.suffix.lower() in DICOM_EXTENSIONS:
        return True
    try:
        if not stat.S_ISREG(path.stat().st_mode):
            return False
        with path.open("rb") as f:
            return has_preamble(f.read(PREAMBLE + len(MAGIC)))
    except OSError:
        return False


def header_patient_id(path: str | Path) -> str:
    """The PatientID tag of a DICOM file, read from its header only ('' when absent, empty
    or unreadable: the build then reports the file itself when it cannot be decoded)."""
    try:
        with open(path, "rb") as f:
            force = not has_preamble(f.read(PREAMBLE + len(MAGIC)))
            f.seek(0)
            ds = pydicom.dcmread(f, stop_before_pixels=True, force=force,
                                 specific_tags=["PatientID"])
        return str(ds.get("PatientID", "") or "").strip()
    except Exception:  # noqa: BLE001 -- pydicom raises many types on damaged headers
        return ""


def read_dicom(source: str | Path | bytes, *, max_pixels: int | None = None,
               skip_lateral: bool = True) -> tuple[np.ndarray, dict[str, Any]]:
    """(uint8 HxW image, meta) of a DICOM file path or its bytes; see the module docstring
    for the conversion and the refusals (`DecodeError`, one line each).

    meta: patient_id, view_position, photometric, modality, sop_class, transfer_syntax,
    bits_stored and voi ("lut", "window" or "none": which VOI transform was applied).
    `max_pixels`: the pixel budget (`image_source.pixel_budget`, also importable from
    `decode`), checked from Rows x Columns.
    """
    data = read_source(source)
    ds = _parse(data)
    meta = _meta(ds)
    _check(ds, meta, pixel_budget(max_pixels), skip_lateral)
    pixels = _pixels(ds, _transfer_syntax(ds))
    try:
        image, meta["voi"] = to_uint8(pixels, ds)
    except (ValueError, NotImplementedError, AttributeError, IndexError, KeyError) as e:
        raise DecodeError(f"cannot apply the DICOM LUTs / window: {_one_line(e)}") from None
    return image, meta


def to_uint8(pixels: np.ndarray, ds: Dataset) -> tuple[np.ndarray, str]:
    """(uint8 image, VOI kind) from stored values: modality LUT -> VOI LUT or window (the
    first) -> MONOCHROME1 inversion -> linear scaling of the VOI's output range to 0..255."""
    values = apply_modality_lut(pixels, ds)
    voi = _voi_kind(ds)
    if voi == "lut":
        if not np.issubdtype(values.dtype, np.integer):  # a rescale made floats
            values = np.rint(values).astype(np.int64)
        values = apply_voi(values, ds, index=0)
        first, count = _lut_span(ds)
        lut = apply_voi(np.arange(first, first + count), ds, index=0)
        lo, hi = float(lut.min()), float(lut.max())
    elif voi == "window":
        values = apply_windowing(values, ds, index=0)
        lo, hi = (float(v) for v in apply_windowing(np.array([-np.inf, np.inf]), ds, index=0))
    else:
        lo, hi = float(values.min()), float(values.max())
    values = np.clip(values.astype(np.float64), lo, hi)
    if str(ds.PhotometricInterpretation).strip().upper() == "MONOCHROME1":
        values = (lo + hi) - values
    if hi > lo:
        values -= lo
        values *= 255.0 / (hi - lo)
        np.rint(values, out=values)
    else:
        values[:] = 0
    return values.astype(np.uint8), voi


def _voi_kind(ds: Dataset) -> str:
    """Which VOI transform applies, as `pydicom.pixels.apply_voi_lut` decides (a usable VOI
    LUT Sequence first, then a window with both centre and width), or "none"."""
    seq = ds.get("VOILUTSequence")
    if seq and seq[0].get("LUTDescriptor") is not None and seq[0].get("LUTData") is not None:
        return "lut"
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        return "window"
    return "none"


def _lut_span(ds: Dataset) -> tuple[int, int]:
    """(first stored value mapped, number of entries) of the first VOI LUT."""
    count, first = ds.VOILUTSequence[0].LUTDescriptor[:2]
    return int(first), int(count) or 2 ** 16


def _parse(data: bytes) -> Dataset:
    """The dataset of a DICOM file's bytes. A file without the preamble (and so without file
    meta: an old or raw DICOM) is read as is, its transfer syntax taken from the encoding
    pydicom detected, so that its native pixel data decodes."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=not has_preamble(data))
    except InvalidDicomError as e:
        raise DecodeError(f"not a DICOM file: {_one_line(e)}") from None
    except Exception as e:  # noqa: BLE001 -- pydicom raises many types on damaged files
        raise DecodeError(f"truncated or damaged DICOM file: {_one_line(e)}") from None
    implicit, little = ds.original_encoding
    if _transfer_syntax(ds) is None and implicit is not None:
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                          ExplicitVRLittleEndian if little else
                                          ExplicitVRBigEndian)
    return ds


def _transfer_syntax(ds: Dataset) -> UID | None:
    file_meta = getattr(ds, "file_meta", None)
    return file_meta.get("TransferSyntaxUID") if file_meta is not None else None


def _meta(ds: Dataset) -> dict[str, Any]:
    file_meta = getattr(ds, "file_meta", None)
    sop = ds.get("SOPClassUID") or (file_meta.get("MediaStorageSOPClassUID")
                                    if file_meta is not None else None)
    syntax = _transfer_syntax(ds)
    return {
        "patient_id": str(ds.get("PatientID", "") or "").strip(),
        "view_position": str(ds.get("ViewPosition", "") or "").strip().upper(),
        "photometric": str(ds.get("PhotometricInterpretation", "") or "").strip().upper(),
        "modality": str(ds.get("Modality", "") or ""),
        "sop_class": sop.name if sop is not None else "",
        "transfer_syntax": syntax.name if syntax is not None else "",
        "bits_stored": int(ds.get("BitsStored", 0) or 0),
        "voi": "none",
    }


def _check(ds: Dataset, meta: dict[str, Any], budget: int, skip_lateral: bool) -> None:
    """Refuse what `read_dicom` does not read, from the header alone."""
    sop = meta["sop_class"] or "unknown SOP class"
    if "PixelData" not in ds:
        if "Image" in sop:
            raise DecodeError(f"truncated or damaged DICOM file: a {sop} object without "
                              f"pixel data")
        raise DecodeError(f"not an image: a DICOM {sop} object (no pixel data)")
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples != 1 or meta["photometric"] not in _GRAYSCALE:
        raise DecodeError(f"colour DICOM image (PhotometricInterpretation "
                          f"{meta['photometric'] or 'missing'}, {samples} sample(s) per "
                          f"pixel); only grayscale radiographs are read")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise DecodeError(f"multi-frame DICOM image ({frames} frames); only single-frame "
                          f"radiographs are read")
    if skip_lateral and meta["view_position"] in LATERAL_VIEWS:
        raise DecodeError(f"lateral view (ViewPosition {meta['view_position']}); frontal "
                          f"views only (skip_lateral=False / --keep-lateral reads it)")
    rows, cols = ds.get("Rows"), ds.get("Columns")
    if not rows or not cols:
        raise DecodeError("truncated or damaged DICOM file: no Rows / Columns")
    if rows * cols > budget:
        raise DecodeError(
            f"too large: {cols}x{rows} = {rows * cols / 1e6:.1f} MP exceeds the pixel budget "
            f"of {budget / 1e6:g} MP (${MAX_PIXELS_ENV})")


def _pixels(ds: Dataset, syntax: UID | None) -> np.ndarray:
    """The stored values, decoded; a transfer syntax without a usable decoder names what
    is missing."""
    if syntax is None:
        raise DecodeError("truncated or damaged DICOM file: no Transfer Syntax UID")
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise DecodeError(f"cannot decode transfer syntax {syntax.name} ({syntax}): pydicom "
                          f"has no decoder for it") from None
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "no plugin available"
        raise DecodeError(f"cannot decode transfer syntax {syntax.name}: missing plugin "
                          f"({missing})")
    try:
        return ds.pixel_array
    except MemoryError:
        raise DecodeError("out of memory while decoding") from None
    except Exception as e:  # noqa: BLE001 -- pydicom and its plugins raise many types
        raise DecodeError(f"truncated or damaged DICOM pixel data: {_one_line(e)}") from None


def _one_line(error: BaseException) -> str:
    """An exception's message on one line (pydicom's span several)."""
    return " ".join(str(error).split()) or type(error).__name__
