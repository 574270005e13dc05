"""Read the folder layouts of chest X-ray sources into a flat list of records, before any build.

Scanning only lists and parses names; it decodes nothing, so a missing or empty root or an
unknown class folder fails (or is reported) before a single file is written. The builders
then decode each record, counting the files that turn out to be unreadable.
"""

from __future__ import annotations

import csv
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from data_pipeline import classes as C
from data_pipeline.decode import IMAGE_EXTENSIONS

MANIFEST = "manifest.csv"
KERMANY_SPLITS = ("train", "test", "val")


@dataclass(frozen=True)
class Record:
    """One image of a source; paths are POSIX and relative to the data_dir the user gave."""

    path: str
    label: str  # canonical class name
    patient_id: str = ""
    source_split: str = ""
    mask_path: str | None = None


@dataclass
class Scan:
    """What a layout scan found: records, things left out (path + reason), mask coverage."""

    root: Path
    records: list[Record] = field(default_factory=list)
    issues: list[dict[str, str]] = field(default_factory=list)
    classes_with_masks: set[str] = field(default_factory=set)

    @property
    def classes(self) -> tuple[str, ...]:
        """Canonical classes that have at least one record, in `classes.CANONICAL` order."""
        return ordered({r.label for r in self.records})

    def report(self, path: Path | str, reason: str) -> None:
        self.issues.append({"path": self.rel(path), "reason": reason})

    def rel(self, path: Path | str) -> str:
        """POSIX path relative to the root."""
        path = Path(path)
        return path.relative_to(self.root).as_posix() if path.is_absolute() else path.as_posix()


def ordered(names: Iterable[str]) -> tuple[str, ...]:
    """Canonical names in `classes.CANONICAL` order, so every source lists classes alike."""
    return tuple(sorted(set(names), key=C.CANONICAL.index))


def check_root(data_dir: str | Path | None, dataset: str) -> Path:
    """Return the resolved root, or raise a one-line error if it is unset, missing or empty."""
    if data_dir is None:
        raise ValueError(f"dataset {dataset!r} needs data_dir (the folder holding its images)")
    root = Path(data_dir).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"data_dir {root} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"data_dir {root} is not a folder")
    if not any(root.iterdir()):
        raise ValueError(f"data_dir {root} is empty")
    return root.resolve()


def _children(folder: Path) -> tuple[list[Path], list[Path]]:
    """Visible sub-folders and files of `folder`, sorted by name (hidden entries are ignored)."""
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    return [p for p in entries if p.is_dir()], [p for p in entries if p.is_file()]


def read_manifest(root: Path) -> dict[str, str]:
    """Map file (POSIX path relative to root, or bare file name) -> patient_id from manifest.csv.

    Returns {} when there is no manifest. Raises ValueError when its header lacks `file` or
    `patient_id`. The `label` column is informative only: folders decide labels.
    """
    path = root / MANIFEST
    if not path.is_file():
        return {}
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"file", "patient_id"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
        return {row["file"].strip().replace("\\", "/"): row["patient_id"].strip()
                for row in reader}


def _patient(manifest: dict[str, str], rel: str) -> str | None:
    return manifest.get(rel, manifest.get(rel.rsplit("/", 1)[-1]))


def _scan_class_folder(scan: Scan, folder: Path, label: str, *,
                       use_masks: bool = False) -> list[tuple[Path, Path | None]]:
    """List (image, mask) pairs of one class folder, flat or with `images/` (+ `masks/`).

    Files without an image extension are reported; an empty folder warns and is reported.
    """
    image_dir = folder / "images" if (folder / "images").is_dir() else folder
    mask_dir = folder / "masks" if use_masks and (folder / "masks").is_dir() else None
    if mask_dir is not None:
        scan.classes_with_masks.add(label)
    _, files = _children(image_dir)
    images = []
    for file in files:
        if file.suffix.lower() not in IMAGE_EXTENSIONS:
            scan.report(file, f"not an image file type ({file.suffix or 'no extension'})")
            continue
        mask = mask_dir / file.name if mask_dir is not None else None
        images.append((file, mask if mask is not None and mask.is_file() else None))
    if not images:
        warnings.warn(f"class folder {folder} has no images", stacklevel=3)
        scan.report(folder, "empty class folder")
    return images


def _class_folders(root: Path, scan: Scan, *, strict: bool) -> list[tuple[Path, str]]:
    """Sub-folders of root with their canonical class; unknown ones raise (strict) or are reported."""
    folders = []
    for folder in _children(root)[0]:
        try:
            folders.append((folder, C.canonical_name(folder.name)))
        except ValueError as e:
            if strict:
                raise ValueError(f"class folder {folder}: {e}") from None
            scan.report(folder, "ignored: not a known class folder")
    if not folders:
        raise ValueError(f"no class folders found in {root}; known classes: {', '.join(C.CANONICAL)}")
    return folders


def _scan_class_root(root: Path, *, strict: bool, use_masks: bool) -> Scan:
    scan = Scan(root)
    manifest = read_manifest(root)
    for folder, label in _class_folders(root, scan, strict=strict):
        for image, mask in _scan_class_folder(scan, folder, label, use_masks=use_masks):
            rel = scan.rel(image)
            scan.records.append(Record(
                rel, label, _patient(manifest, rel) or "",
                mask_path=scan.rel(mask) if mask is not None else None))
    return scan


def scan_covid19_radiography(root: Path) -> Scan:
    """Kaggle "COVID-19 Radiography Database": v4 `<Class>/images/` (+ `masks/`) or v1 flat `<Class>/`.

    Folders that name no known class (e.g. a stray `backup/`) are ignored and reported.
    """
    return _scan_class_root(root, strict=False, use_masks=True)


def scan_image_folder(root: Path) -> Scan:
    """Any `root/<class>/[images/]*`; a folder name that is no known class is an error."""
    return _scan_class_root(root, strict=True, use_masks=False)


_PERSON = re.compile(r"^person(\d+)_", re.IGNORECASE)
_NORMAL_IM = re.compile(r"(?:^|-)IM-(\d+)-", re.IGNORECASE)
_KIND = re.compile(r"_(bacteria|virus)_", re.IGNORECASE)


def kermany_patient_id(file_name: str) -> str:
    """Patient id from a Kermany file name, '' when the name follows no known pattern.

    `person1011_bacteria_2942.jpeg` -> `kermany-person1011` (one id covers a person's virus
    and bacteria images). Normals carry no person number; `IM-0115-0001.jpeg` and
    `NORMAL2-IM-0115-0001.jpeg` both map to `kermany-normal-IM115`: the IM number is the
    study (patient) and its suffix the image. Merging the two NORMAL batches on the IM number
    can only over-group, which keeps patient-disjoint splits safe.
    """
    if m := _PERSON.match(file_name):
        return f"kermany-person{int(m.group(1))}"
    if m := _NORMAL_IM.search(file_name):
        return f"kermany-normal-IM{int(m.group(1))}"
    return ""


def kermany_root(root: Path) -> Path:
    """The folder holding train/test/val: `root` itself or `root/chest_xray`."""
    for candidate in (root, root / "chest_xray"):
        if candidate.is_dir() and any((candidate / s).is_dir() for s in KERMANY_SPLITS):
            return candidate
    raise ValueError(f"no {'/'.join(KERMANY_SPLITS)} folders in {root} or {root / 'chest_xray'}")


def scan_chest_xray_pneumonia(root: Path, num_classes: int = 3) -> Scan:
    """Kermany `{train,test,val}/{NORMAL,PNEUMONIA}/`; 3 classes split PNEUMONIA by file name.

    With num_classes=3, pneumonia files named neither `_bacteria_` nor `_virus_` are reported.
    Unknown folders at the split or class level are ignored and reported.
    """
    if num_classes not in (2, 3):
        raise ValueError(f"chest_xray_pneumonia: num_classes must be 2 or 3, got {num_classes!r}")
    scan = Scan(root)
    base = kermany_root(root)
    manifest = read_manifest(root)
    for split_dir in _children(base)[0]:
        split = split_dir.name.lower()
        if split not in KERMANY_SPLITS:
            scan.report(split_dir, "ignored: not a train/test/val folder")
            continue
        for folder, label in _class_folders(split_dir, scan, strict=False):
            if label not in (C.NORMAL, C.PNEUMONIA):
                scan.report(folder, "ignored: Kermany has only NORMAL and PNEUMONIA")
                continue
            for image, _ in _scan_class_folder(scan, folder, label):
                rel = scan.rel(image)
                kind = _KIND.search(image.name)
                if label == C.PNEUMONIA and num_classes == 3:
                    if kind is None:
                        scan.report(image, "cannot tell bacterial from viral pneumonia by name")
                        continue
                    label_k = (C.BACTERIAL_PNEUMONIA if kind.group(1).lower() == "bacteria"
                               else C.VIRAL_PNEUMONIA)
                else:
                    label_k = label
                pid = _patient(manifest, rel) or kermany_patient_id(image.name)
                scan.records.append(Record(rel, label_k, pid, source_split=split))
    return scan
