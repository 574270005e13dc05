"""Read the folder layouts of chest X-ray sources into a flat list of records, before any build.

Scanning only lists and parses names; it decodes nothing, so a missing or empty root or an
unknown class folder fails (or is reported) before a single file is written. The builders
then decode each record, counting the files that turn out to be unreadable. DICOM is the
exception that reads a little: a file whose extension is no image type is opened for its
first 132 bytes (a DICOM preamble makes it an image), and a DICOM file's header gives the
patient id (its PatientID tag) when no manifest does, so DICOM folders split by patient.

Every entry under the root is either a record or reported (path + reason) in `Scan.issues`:
hidden entries, symlink loops, dangling symlinks, names that are not UTF-8, FIFOs, sockets,
devices, folders where files belong, files where folders belong, unused `masks/`, masks
without an image and manifest rows that match no file. Entries are classified by `os.stat`
before anything is opened, and only regular files are, so a FIFO never blocks a scan.
"""

from __future__ import annotations

import csv
import errno
import io
import os
import re
import stat
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from data_pipeline import classes as C
from data_pipeline.decode import DICOM_EXTENSIONS, IMAGE_EXTENSIONS, file_kind
from data_pipeline.dicom import header_patient_id, is_dicom
from data_pipeline.image_source import DataError

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
    ignore: frozenset[Path] = frozenset()  # resolved folders left out unreported (a cache)

    @property
    def classes(self) -> tuple[str, ...]:
        """Canonical classes that have at least one record, in `classes.CANONICAL` order."""
        return ordered({r.label for r in self.records})

    def report(self, path: Path | str, reason: str) -> None:
        self.issues.append({"path": printable(self.rel(path)), "reason": reason})

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
        raise DataError(f"dataset {dataset!r} needs data_dir (the folder holding its images)")
    root = Path(data_dir).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"data_dir {root} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"data_dir {root} is not a folder")
    if not any(root.iterdir()):
        raise DataError(f"data_dir {root} is empty")
    return root.resolve()


def printable(text: str) -> str:
    """`text` safe to print on one line and to store as UTF-8: bytes of a non-UTF-8 name as
    \\xNN, control characters escaped."""
    text = os.fsencode(text).decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in text)


def is_utf8(name: str) -> bool:
    """Whether a file name (as os.fsdecode gives it) is valid UTF-8."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def classify(path: Path, *, hidden: bool = True) -> tuple[str, str]:
    """("dir", "") or ("file", "") for a folder or regular file (symlinks followed), else
    ("skip", reason): a hidden entry (with `hidden`), a name that is not UTF-8, a symlink
    loop, a dangling symlink, a FIFO, socket or device, or an entry that cannot be looked
    at. Opens nothing."""
    if not is_utf8(path.name):
        return "skip", "name is not valid UTF-8 (rename it)"
    if hidden and path.name.startswith("."):
        try:
            folder = stat.S_ISDIR(path.lstat().st_mode)
        except OSError:
            folder = False
        return "skip", "hidden folder (not read)" if folder else "hidden file"
    try:
        mode = path.stat().st_mode
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "skip", "symlink loop"
        if path.is_symlink():
            try:
                target = printable(os.readlink(path))
            except OSError:
                target = "?"
            return "skip", f"dangling symlink (target {target} is missing)"
        return "skip", f"cannot read: {e.strerror or e}"
    if stat.S_ISDIR(mode):
        return "dir", ""
    if stat.S_ISREG(mode):
        return "file", ""
    return "skip", f"not a regular file ({file_kind(mode)})"


def count_files(folder: Path) -> int:
    """Entries below `folder`, symlinks not followed (what a skipped folder leaves unread)."""
    n = 0
    for _, dirs, files in os.walk(folder):
        n += len(dirs) + len(files)
    return n


def _children(scan: Scan, folder: Path) -> tuple[list[Path], list[Path]]:
    """Sub-folders and regular files of `folder`, sorted by name; every other entry is
    reported with its reason (see `classify`)."""
    try:
        entries = sorted(folder.iterdir())
    except OSError as e:
        scan.report(folder, f"cannot list folder: {e.strerror or e}")
        return [], []
    dirs, files = [], []
    for entry in entries:
        if scan.ignore and _resolved(entry) in scan.ignore:
            continue
        kind, reason = classify(entry)
        if kind == "dir":
            dirs.append(entry)
        elif kind == "file":
            files.append(entry)
        else:
            scan.report(entry, reason)
    return dirs, files


def _resolved(path: Path) -> Path | None:
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # a symlink loop
        return None


def _report_folder(scan: Scan, folder: Path, why: str) -> None:
    if folder.is_symlink():  # not walked: it may point anywhere, an ancestor included
        target = printable(os.readlink(folder))
        scan.report(folder, f"folder not read: {why} (a symlink to {target})")
        return
    n = count_files(folder)
    scan.report(folder, f"folder not read: {why} ({n} entr{'y' if n == 1 else 'ies'} inside)")


def read_manifest(root: Path) -> dict[str, str]:
    """Map file (POSIX path relative to root, or bare file name) -> patient_id from manifest.csv.

    Returns {} when there is no manifest. Raises a one-line DataError naming the file (and
    line) when it is not UTF-8 text or not CSV, its header lacks `file` or `patient_id`, a row
    has fewer or more fields than the header, or one file is listed with two patient ids.
    A UTF-8 byte-order mark is accepted. The `label` column is informative only: folders
    decide labels.
    """
    path = root / MANIFEST
    if not path.is_file():
        return {}
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise DataError(f"{path} line {line}: not UTF-8 text (byte 0x{data[e.start]:02x})"
                        ) from None
    out: dict[str, str] = {}
    first_line: dict[str, int] = {}
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        missing = {"file", "patient_id"} - set(reader.fieldnames or ())
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
        width = len(reader.fieldnames)
        for row in reader:
            line = reader.line_num
            if None in row:
                raise DataError(f"{path} line {line}: more fields than the {width} of the "
                                f"header")
            if any(v is None for v in row.values()):
                n = sum(v is not None for v in row.values())
                raise DataError(f"{path} line {line}: {n} field(s), the header has {width}")
            name = row["file"].strip().replace("\\", "/")
            pid = row["patient_id"].strip()
            if not name:
                raise DataError(f"{path} line {line}: empty `file`")
            if name in out and out[name] != pid:
                raise DataError(f"{path} line {line}: {name} has patient id {pid!r}, but "
                                f"line {first_line[name]} gives {out[name]!r}")
            out.setdefault(name, pid)
            first_line.setdefault(name, line)
    except csv.Error as e:
        raise DataError(f"{path}: not valid CSV: {e}") from None
    return out


def _patient(manifest: dict[str, str], rel: str) -> str | None:
    return manifest.get(rel, manifest.get(rel.rsplit("/", 1)[-1]))


def dicom_patient_id(image: Path) -> str:
    """The PatientID tag of a DICOM image, from its header; '' for another image type
    (not opened) or a DICOM file without one."""
    if image.suffix.lower() in IMAGE_EXTENSIONS - DICOM_EXTENSIONS:
        return ""
    return header_patient_id(image)


def _report_unmatched(scan: Scan, manifest: dict[str, str]) -> None:
    """Warn about (and report) manifest rows that name no file the scan saw."""
    if not manifest:
        return
    seen = {r.path for r in scan.records} | {i["path"] for i in scan.issues}
    names = {p.rsplit("/", 1)[-1] for p in seen}
    unmatched = [k for k in manifest if k not in seen and ("/" in k or k not in names)]
    if unmatched:
        reason = (f"{len(unmatched)} of {len(manifest)} row(s) match no file under the root "
                  f"(first: {printable(unmatched[0])}); their patient ids are unused")
        warnings.warn(f"{scan.root / MANIFEST}: {reason}", stacklevel=3)
        scan.report(MANIFEST, reason)


def _scan_class_folder(scan: Scan, folder: Path, label: str, *,
                       use_masks: bool = False) -> list[tuple[Path, Path | None]]:
    """List (image, mask) pairs of one class folder, flat or with `images/` (+ `masks/`).

    Files with another extension (or none) are images when their content is DICOM.
    Everything else in it is reported: other files, sub-folders (a
    folder named `x.png` included), files beside `images/`, an unused `masks/`, masks that
    match no image. An empty folder warns and is reported.
    """
    dirs, files = _children(scan, folder)
    by_name = {d.name: d for d in dirs}
    image_dir = by_name.get("images")
    mask_dir = by_name.get("masks") if use_masks else None
    if mask_dir is not None:
        scan.classes_with_masks.add(label)
    for d in dirs:
        if d is image_dir or d is mask_dir:
            continue
        why = ("this layout uses no masks" if d.name == "masks" else
               "a folder inside a class folder, named like an image" if
               d.suffix.lower() in IMAGE_EXTENSIONS else "a folder inside a class folder")
        _report_folder(scan, d, why)
    if image_dir is not None:
        for file in files:
            scan.report(file, "beside images/ (this class keeps its images in images/)")
        sub_dirs, files = _children(scan, image_dir)
        for d in sub_dirs:
            _report_folder(scan, d, "a folder inside images/")
    masks: dict[str, Path] = {}
    if mask_dir is not None:
        mask_sub_dirs, mask_files = _children(scan, mask_dir)
        for d in mask_sub_dirs:
            _report_folder(scan, d, "a folder inside masks/")
        masks = {m.name: m for m in mask_files}
    images = []
    for file in files:
        if file.suffix.lower() not in IMAGE_EXTENSIONS and not is_dicom(file):
            scan.report(file, f"not an image file type ({file.suffix or 'no extension'})")
            continue
        images.append((file, masks.get(file.name)))
    image_names = {f.name for f in files}
    for name, mask in masks.items():
        if name not in image_names:
            scan.report(mask, "mask with no image of this name")
    if not images:
        warnings.warn(f"class folder {folder} has no images", stacklevel=3)
        scan.report(folder, "empty class folder")
    return images


def _class_folders(root: Path, scan: Scan, *, strict: bool) -> list[tuple[Path, str]]:
    """Sub-folders of root with their canonical class; unknown ones raise (strict) or are
    reported; files there (but the manifest) are reported."""
    dirs, files = _children(scan, root)
    for file in files:
        if not (file.name == MANIFEST and file.parent == scan.root):
            scan.report(file, "not in a class folder")
    folders = []
    for folder in dirs:
        try:
            folders.append((folder, C.canonical_name(folder.name)))
        except ValueError as e:
            if strict:
                raise DataError(f"class folder {printable(str(folder))}: {e}") from None
            scan.report(folder, "ignored: not a known class folder")
    if not folders:
        raise DataError(f"no class folders found in {root}; known classes: {', '.join(C.CANONICAL)}")
    return folders


def _scan_class_root(root: Path, *, strict: bool, use_masks: bool,
                     ignore: frozenset[Path]) -> Scan:
    scan = Scan(root, ignore=ignore)
    manifest = read_manifest(root)
    for folder, label in _class_folders(root, scan, strict=strict):
        for image, mask in _scan_class_folder(scan, folder, label, use_masks=use_masks):
            rel = scan.rel(image)
            scan.records.append(Record(
                rel, label, _patient(manifest, rel) or dicom_patient_id(image),
                mask_path=scan.rel(mask) if mask is not None else None))
    _report_unmatched(scan, manifest)
    return scan


def scan_covid19_radiography(root: Path, *, ignore: frozenset[Path] = frozenset()) -> Scan:
    """Kaggle "COVID-19 Radiography Database": v4 `<Class>/images/` (+ `masks/`) or v1 flat `<Class>/`.

    Folders that name no known class (e.g. a stray `backup/`) are ignored and reported.
    `ignore`: resolved folders to pass over without a report (a cache inside the root).
    """
    return _scan_class_root(root, strict=False, use_masks=True, ignore=frozenset(ignore))


def scan_image_folder(root: Path, *, ignore: frozenset[Path] = frozenset()) -> Scan:
    """Any `root/<class>/[images/]*`; a folder name that is no known class is an error."""
    return _scan_class_root(root, strict=True, use_masks=False, ignore=frozenset(ignore))


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
    raise DataError(f"no {'/'.join(KERMANY_SPLITS)} folders in {root} or {root / 'chest_xray'}")


def scan_chest_xray_pneumonia(root: Path, num_classes: int = 3, *,
                              ignore: frozenset[Path] = frozenset()) -> Scan:
    """Kermany `{train,test,val}/{NORMAL,PNEUMONIA}/`; 3 classes split PNEUMONIA by file name.

    With num_classes=3, pneumonia files named neither `_bacteria_` nor `_virus_` are reported.
    Unknown folders at the split or class level, and whatever lies beside `chest_xray/` when
    the root holds it, are ignored and reported.
    """
    if num_classes not in (2, 3):
        raise DataError(f"chest_xray_pneumonia: num_classes must be 2 or 3, got {num_classes!r}")
    scan = Scan(root, ignore=frozenset(ignore))
    base = kermany_root(root)
    manifest = read_manifest(root)
    if base != root:
        dirs, files = _children(scan, root)
        for entry in dirs + files:
            if entry != base and not (entry.name == MANIFEST and entry in files):
                scan.report(entry, f"ignored: beside {base.name}/, which holds the splits")
    split_dirs, files = _children(scan, base)
    for file in files:
        if not (file.name == MANIFEST and base == root):
            scan.report(file, "not in a train/test/val folder")
    for split_dir in split_dirs:
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
                pid = (_patient(manifest, rel) or dicom_patient_id(image)
                       or kermany_patient_id(image.name))
                scan.records.append(Record(rel, label_k, pid, source_split=split))
    _report_unmatched(scan, manifest)
    return scan
