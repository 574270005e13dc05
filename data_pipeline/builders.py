"""TFDS builders (array_record) for every source, built without TensorFlow.

Images reach `tfds.features.Image` as PNG bytes encoded with Pillow: TFDS needs TensorFlow
only to encode arrays itself. Builds use one split, `full`, in generation order
(`disable_shuffling`), and store with the data, in the dataset info metadata:
  - `skipped`: [{"path", "reason"}] for every file or folder left out, so a cached load
    still reports them;
  - `index`: per-example label / patient_id / path / source_split, so a loader can read
    labels and patient ids without decoding a single image.
TFDS writes into an `incomplete.*` folder and renames it only once everything (metadata
included) is written, so an interrupted build never passes for a complete one.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds

from data_pipeline import layouts
from data_pipeline.decode import (
    DecodeError,
    decode_for_storage,
    decode_mask,
    encode_png,
)

SPLIT = "full"
INDEX_FIELDS = ("label", "patient_id", "path", "source_split")


class CxrBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared features and skip bookkeeping; subclasses yield decoded examples via `_examples`."""

    VERSION = tfds.core.Version("1.2.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "First release.",
        "1.1.0": "Every odd entry (hidden, symlink loop, FIFO, ...) is a counted skip; a "
                 "pixel budget; images over decode.MAX_SIDE are downscaled while decoding.",
        "1.2.0": "DICOM files (data_pipeline.dicom), patient ids from their PatientID tag; "
                 "lateral views skipped unless skip_lateral=False."}

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> None:
        """None: no checksums file beside the code. TFDS 4.9.10 would otherwise probe the
        module path with `importlib_resources`, which it installs only for Python < 3.9."""

    def __init__(self, *, class_names: Sequence[str], has_masks: bool,
                 issues: Sequence[dict[str, str]] = (), data_dir: str | Path):
        self._class_names = tuple(class_names)
        self._has_masks = has_masks
        self._skipped = [dict(i) for i in issues]
        super().__init__(data_dir=str(data_dir), file_format="array_record")

    # TFDS prints "Downloading and preparing dataset Unknown size ..." and "... downloaded and
    # prepared" around a build; nothing is downloaded here, so say what happens instead.
    def _log_download_bytes(self) -> None:
        print(f"building {self.name} into {self.data_dir} (once; later runs reuse it)",
              file=sys.stderr)

    def _log_download_done(self) -> None:
        print(f"built {self.name}: {self.data_dir}", file=sys.stderr)

    def _info(self) -> tfds.core.DatasetInfo:
        features = {
            "image": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
            "label": tfds.features.ClassLabel(names=self._class_names),
            "patient_id": tfds.features.Text(),
            "path": tfds.features.Text(),
            "source_split": tfds.features.Text(),
        }
        if self._has_masks:
            features["mask"] = tfds.features.Image(shape=(None, None, 1), encoding_format="png")
        return tfds.core.DatasetInfo(
            builder=self, description=(self.__doc__ or "").strip(),
            features=tfds.features.FeaturesDict(features),
            metadata=tfds.core.MetadataDict(), disable_shuffling=True)

    def _split_generators(self, dl_manager):
        del dl_manager  # local sources only
        return {SPLIT: self._generate_examples()}

    def _examples(self) -> Iterator[dict[str, Any] | dict[str, str]]:
        """Yield examples {image, label, patient_id, path, source_split[, mask]}, images as
        uint8 HxWx1 arrays or ready PNG bytes, or {"path", "reason"} for a file to skip."""
        raise NotImplementedError

    def _generate_examples(self):
        index: dict[str, list] = {k: [] for k in INDEX_FIELDS}
        for example in self._examples():
            if "reason" in example:
                self._skipped.append(example)
                continue
            for k in INDEX_FIELDS:
                index[k].append(example[k])
            encoded = dict(example)
            for k in ("image", "mask") if self._has_masks else ("image",):
                if isinstance(example[k], np.ndarray):
                    encoded[k] = encode_png(example[k])
            yield example["path"], encoded
        self.info.metadata["skipped"] = self._skipped
        self.info.metadata["index"] = index


class SyntheticCxr(CxrBuilder, skip_registration=True):
    """Synthetic chest X-ray phantoms with lung masks (data_pipeline.synthetic)."""

    name = "synthetic_cxr"

    def __init__(self, *, count: int, image_size: int, seed: int, **kwargs):
        self._count, self._image_size, self._seed = count, image_size, seed
        super().__init__(has_masks=True, **kwargs)

    def _examples(self):
        # Imported on build only: scipy rendering is not needed to read a cached dataset.
        from data_pipeline.synthetic import generate_phantoms

        data = generate_phantoms(self._count, image_size=self._image_size,
                                 classes=self._class_names, seed=self._seed)
        if tuple(data["class_names"]) != self._class_names:
            raise RuntimeError(f"phantom classes {data['class_names']} != {self._class_names}")
        for i in range(len(data["label"])):
            yield {"image": data["image"][i], "mask": data["mask"][i],
                   "label": int(data["label"][i]), "patient_id": str(data["patient_id"][i]),
                   "path": f"synthetic/{i:06d}.png", "source_split": ""}


class _FolderBuilder(CxrBuilder, skip_registration=True):
    """Decodes the records of a layout scan; unreadable files (and files over the pixel
    budget, lateral DICOM views with `skip_lateral`, or files gone since the scan) become
    counted skips."""

    def __init__(self, *, root: Path, records: Sequence[layouts.Record],
                 max_pixels: int | None = None, skip_lateral: bool = True, **kwargs):
        self._root = root
        self._records = list(records)
        self._max_pixels = max_pixels
        self._skip_lateral = skip_lateral
        super().__init__(**kwargs)

    def _examples(self):
        label_of = {name: k for k, name in enumerate(self._class_names)}
        for r in self._records:
            try:
                image, png = decode_for_storage(self._root / r.path,
                                                max_pixels=self._max_pixels,
                                                skip_lateral=self._skip_lateral)
                example = {"image": png, "label": label_of[r.label], "patient_id": r.patient_id,
                           "path": r.path, "source_split": r.source_split}
                if self._has_masks:
                    if r.mask_path is None:
                        yield {"path": r.path, "reason": "no mask with this name in masks/"}
                        continue
                    example["mask"] = _mask(self._root / r.mask_path, image.shape[:2])
                yield example
            except DecodeError as e:
                yield {"path": r.path, "reason": str(e)}


def _mask(path: Path, size: tuple[int, int]) -> np.ndarray:
    try:
        return decode_mask(path, size)
    except DecodeError as e:
        raise DecodeError(f"mask {path.name}: {e}") from None


class Covid19Radiography(_FolderBuilder, skip_registration=True):
    """Kaggle COVID-19 Radiography Database (v1 flat or v4 images/ + masks/ layout)."""

    name = "covid19_radiography"


class ChestXrayPneumonia(_FolderBuilder, skip_registration=True):
    """Kermany et al. 2018 pediatric chest X-rays, {train,test,val}/{NORMAL,PNEUMONIA}/."""

    name = "chest_xray_pneumonia"


class ImageFolder(_FolderBuilder, skip_registration=True):
    """Any root/<class>/[images/]* folder tree with harmonised class names."""

    name = "image_folder"
