"""One entry point to every chest X-ray source: `load_dataset(name, ...) -> Dataset`.

Each source is scanned (errors before anything is written), built once into an array_record
TFDS dataset under the cache, and read back through `tfds.data_source` without TensorFlow.
The cache key hashes the source folder's resolved path, its file listing (path, size and a
SHA-256 of each file's content) and the options, so editing the folder or the options builds
anew -- also an edit that keeps a file's size and mtime. Content digests are cached per source
folder under `<cache>/file-hashes/`, keyed by each file's size, mtime, inode and ctime (ctime
cannot be set back by a user), so a rebuild check stats every file but re-reads only the files
whose stat changed.

A build of one key holds an exclusive `fcntl.flock` on `<cache>/<dataset>-<key>.lock`: a second
process (or thread) building the same dataset waits (saying so on stderr, up to
`BUILD_LOCK_TIMEOUT_S`) and then reuses the finished build. Under that lock, `incomplete.*`
folders left in that dataset's folder by a killed build are removed before building.
`build_lock` and `remove_incomplete` serve the decode-once array stores too, which live
under `<cache>/arrays/<dataset>-<key>/` (`data_pipeline.array_cache`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import stat
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from data_pipeline import builders, layouts
from data_pipeline import classes as C
from data_pipeline.decode import pixel_budget
from data_pipeline.image_source import DataError

DATASETS: tuple[str, ...] = (
    "synthetic_cxr", "covid19_radiography", "chest_xray_pneumonia", "image_folder")

_OPTIONS: dict[str, dict[str, Any]] = {
    "synthetic_cxr": {"count": 1000, "image_size": 128, "seed": 0},
    "covid19_radiography": {"max_pixels": None, "skip_lateral": True},
    "chest_xray_pneumonia": {"num_classes": 3, "max_pixels": None, "skip_lateral": True},
    "image_folder": {"max_pixels": None, "skip_lateral": True},
}
_SCANS = {
    "covid19_radiography": (layouts.scan_covid19_radiography, builders.Covid19Radiography),
    "chest_xray_pneumonia": (layouts.scan_chest_xray_pneumonia, builders.ChestXrayPneumonia),
    "image_folder": (layouts.scan_image_folder, builders.ImageFolder),
}
_TEXT_FIELDS = ("patient_id", "path", "source_split")
BUILD_LOCK_TIMEOUT_S = 6 * 3600.0  # how long a build waits for another build of the same key
_LOCK_POLL_S = 0.2
INCOMPLETE_PREFIX = "incomplete."  # TFDS's temporary build folder (renamed when complete)


class _DropOpenCvAdvice(logging.Filter):
    """TFDS warns once per process that OpenCV would decode faster; we decode with Pillow on
    purpose (one decoder, no OpenCV dependency), so the advice is noise in every CLI run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("OpenCV is not installed")


logging.getLogger("absl").addFilter(_DropOpenCvAdvice())


def default_cache_dir() -> Path:
    """`$CXR_ENSEMBLES_CACHE`, else ~/.cache/cxr-ensembles/tfds."""
    env = os.environ.get("CXR_ENSEMBLES_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cxr-ensembles" / "tfds"


class ExampleSource:
    """Random access to built examples with text fields as str and labels as int.

    Wraps the `tfds.data_source`; implements `__len__`/`__getitem__` so Grain (and
    `__getitems__`, batch reads) consume it directly. Picklable for Grain workers.
    `arrays_dir`, where set, is the folder of this split's decode-once array stores
    (`data_pipeline.array_cache`), outside the TFDS build folder.
    """

    def __init__(self, tfds_source, arrays_dir: Path | None = None):
        self._source = tfds_source
        self.arrays_dir = arrays_dir

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return _convert(self._source[index])

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        return [_convert(e) for e in self._source.__getitems__(list(indices))]

    def __repr__(self) -> str:
        return f"ExampleSource({self._source!r})"


def _convert(example: dict[str, Any]) -> dict[str, Any]:
    out = dict(example, label=int(example["label"]))
    for k in _TEXT_FIELDS:
        out[k] = example[k].decode("utf-8") if isinstance(example[k], bytes) else str(example[k])
    return out


@dataclass(frozen=True)
class Dataset:
    """A built source: random-access examples plus per-example metadata read without decoding."""

    name: str
    class_names: tuple[str, ...]
    source: ExampleSource
    labels: np.ndarray
    patient_ids: np.ndarray
    source_splits: np.ndarray
    paths: np.ndarray
    skipped: list[dict[str, str]]
    has_masks: bool
    build_dir: Path

    def __len__(self) -> int:
        return len(self.labels)


def _options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; available: {', '.join(DATASETS)}")
    defaults = _OPTIONS[name]
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        accepted = ", ".join(defaults) or "none"
        raise DataError(f"unknown option(s) {', '.join(unknown)} for {name}; accepted: {accepted}")
    return {**defaults, **options}


def _listing(root: Path, skip: Path | None = None,
             digests: dict[str, list] | None = None) -> list[tuple[str, int, str | None]]:
    """(relative path, size, content SHA-256) of every file under root, sorted, outside `skip`
    (a cache kept inside the data folder must not change the key it is stored under).
    An entry that cannot be stat'ed (a dangling symlink, a loop) is keyed by its link, with
    no digest. `digests` (relative path -> [size, mtime_ns, inode, ctime_ns, sha]) is reused
    where the stat matches and updated in place."""
    digests = {} if digests is None else digests
    rows, seen = [], set()
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if skip is None or _resolved(Path(folder, d)) != skip)
        for f in sorted(files):
            path = Path(folder) / f
            rel = os.path.relpath(path, root)
            try:
                st = path.stat()
            except OSError:
                try:
                    st = path.lstat()
                except OSError:
                    continue
                rows.append((rel, st.st_size, None))
                continue
            if not stat.S_ISREG(st.st_mode):   # a FIFO or socket: opening one would block
                rows.append((rel, st.st_size, None))
                continue
            stamp = [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]
            cached = digests.get(rel)
            if cached is not None and cached[:4] == stamp:
                sha = cached[4]
            else:
                sha = _file_digest(path)
                if sha is not None:
                    digests[rel] = [*stamp, sha]
            seen.add(rel)
            rows.append((rel, st.st_size, sha))
    for rel in set(digests) - seen:
        del digests[rel]
    return rows


def _file_digest(path: Path) -> str | None:
    """SHA-256 of a file's content, or None when it cannot be read (the scan reports it)."""
    h = hashlib.sha256()
    try:
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError:
        return None
    return h.hexdigest()


def _digest_cache(build_root: Path | None, root: Path) -> Path | None:
    if build_root is None:
        return None
    tag = hashlib.sha256(str(root).encode()).hexdigest()[:20]
    return build_root / "file-hashes" / f"{tag}.json"


def _read_digests(path: Path | None) -> dict[str, list]:
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # missing or damaged: hash everything again
    return data if isinstance(data, dict) else {}


def _write_digests(path: Path | None, digests: dict[str, list]) -> None:
    """Atomic replace, so concurrent checks each leave a whole (equally valid) file."""
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
        tmp.write_text(json.dumps(digests, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs re-hashing next time


def _resolved(path: Path) -> Path | None:
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # a symlink loop
        return None


def cache_key(name: str, root: Path | None, options: dict[str, Any],
              build_root: Path | None = None) -> str:
    """Hash of dataset, builder version, resolved root, its file listing (with each file's
    content digest) and the options."""
    files = []
    if root:
        store = _digest_cache(build_root, root)
        digests = _read_digests(store)
        before = json.dumps(digests, sort_keys=True)
        files = _listing(root, build_root.resolve() if build_root else None, digests)
        if json.dumps(digests, sort_keys=True) != before:
            _write_digests(store, digests)
    payload = {"dataset": name, "version": str(builders.CxrBuilder.VERSION), "options": options,
               "root": str(root) if root else None, "files": files}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def _builder(name: str, data_dir, classes, build_root: Path, opts: dict[str, Any]):
    """Scan (for folders) and return a builder and its cache folder; nothing is built yet."""
    if name == "synthetic_cxr":
        class_names = C.select_classes(C.DEFAULT_CLASSES, classes) if classes else C.DEFAULT_CLASSES
        key = cache_key(name, None, {**opts, "classes": class_names})
        folder = build_root / f"{name}-{key}"
        return builders.SyntheticCxr(class_names=class_names, data_dir=folder, **opts), folder
    scan_fn, builder_cls = _SCANS[name]
    root = layouts.check_root(data_dir, name)
    opts = {**opts, "max_pixels": pixel_budget(opts["max_pixels"])}
    scan_opts = {k: v for k, v in opts.items() if k not in ("max_pixels", "skip_lateral")}
    ignore = frozenset(p for p in (_resolved(build_root),) if p is not None)
    scan = scan_fn(root, ignore=ignore, **scan_opts)
    if not scan.records:
        raise DataError(f"no images found under {root}")
    class_names = C.select_classes(scan.classes, classes)
    records = [r for r in scan.records if r.label in class_names]
    has_masks = set(class_names) <= scan.classes_with_masks
    key = cache_key(name, root, {**opts, "classes": class_names}, build_root)
    folder = build_root / f"{name}-{key}"
    return builder_cls(root=root, records=records, issues=scan.issues, class_names=class_names,
                       has_masks=has_masks, max_pixels=opts["max_pixels"],
                       skip_lateral=opts["skip_lateral"], data_dir=folder), folder


@contextlib.contextmanager
def build_lock(folder: Path):
    """Exclusive flock on `<folder>.lock` (beside the build folder) for the build of one key.

    Waits for another holder, saying so once on stderr, and raises TimeoutError after
    `BUILD_LOCK_TIMEOUT_S`. The lock file stays (removing it would race a waiter)."""
    lock_path = folder.with_name(folder.name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o664)
    try:
        deadline, told = time.monotonic() + BUILD_LOCK_TIMEOUT_S, False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not told:
                    print(f"waiting for another build of {folder.name} to finish "
                          f"(lock {lock_path})", file=sys.stderr, flush=True)
                    told = True
                if time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"another process has been building {folder} for over "
                        f"{BUILD_LOCK_TIMEOUT_S:g} s (lock {lock_path}); retry later") from None
                time.sleep(_LOCK_POLL_S)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def remove_incomplete(folder: Path) -> None:
    """Remove `incomplete.*` build folders a killed build left under `folder`; call only
    while holding its build lock, so no live build's folder is touched."""
    if not folder.is_dir():
        return
    for path in sorted(folder.rglob(INCOMPLETE_PREFIX + "*")):
        if path.is_dir() and not path.is_symlink():
            print(f"removing {path} left by an interrupted build", file=sys.stderr)
            shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _tfds_bars(enable: bool):
    """tfds's own build bars ("Generating splits...") off for one build when `enable` is
    False; tfds keeps the switch global, so it is switched back on afterwards."""
    if enable:
        yield
        return
    tfds.display_progress_bar(False)
    try:
        yield
    finally:
        tfds.display_progress_bar(True)


def load_dataset(name: str, *, data_dir: str | Path | None = None,
                 classes: Sequence[str] | None = None, cache_dir: str | Path | None = None,
                 progress: bool = True, **options) -> Dataset:
    """Build (once, cached) and open a dataset by name; see docs/interfaces.md.

    Options: synthetic_cxr count=1000, image_size=128, seed=0; chest_xray_pneumonia
    num_classes=3 (normal/viral/bacterial) or 2 (normal/pneumonia); every folder source
    max_pixels (default `$CXR_ENSEMBLES_MAX_PIXELS`, else 50 MP): images with more pixels are
    counted skips, checked from the header before decoding; every folder source
    skip_lateral=True: DICOM lateral views (ViewPosition LL, RL, ...) are counted skips
    (`data_pipeline.dicom`). `classes` keeps a subset
    of canonical classes in the given order. Raises DataError (a ValueError) /
    FileNotFoundError with a one-line message for unknown names or options and missing, empty
    or class-less roots.
    `classes` may also be one comma-separated string.

    Every entry under a folder source is either an example or in `Dataset.skipped` with its
    reason (see `data_pipeline.layouts`); one bad file never aborts the build.
    `progress=False` silences tfds's bars while it builds.
    """
    opts = _options(name, options)
    if isinstance(classes, str):
        classes = [c for c in classes.split(",") if c.strip()]
    build_root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    builder, folder = _builder(name, data_dir, classes, build_root, opts)
    with build_lock(folder), _tfds_bars(progress):
        remove_incomplete(folder)
        builder.download_and_prepare()  # reuses the build when another holder finished it
    # Read through a generic read-only builder: it pickles (Grain workers) by its folder alone.
    reader = tfds.builder_from_directory(builder.data_dir)
    meta = reader.info.metadata
    source = reader.as_data_source(split=builders.SPLIT)
    index = meta["index"]
    if len(index["label"]) != len(source):
        raise RuntimeError(f"cached build {builder.data_dir} is inconsistent; delete it and retry")
    return Dataset(
        name=name,
        class_names=tuple(reader.info.features["label"].names),
        source=ExampleSource(source, arrays_dir=(build_root / "arrays" / folder.name /
                                                 builders.SPLIT).absolute()),
        labels=np.asarray(index["label"], dtype=np.int64),
        patient_ids=np.asarray(index["patient_id"], dtype=str),
        source_splits=np.asarray(index["source_split"], dtype=str),
        paths=np.asarray(index["path"], dtype=str),
        skipped=list(meta["skipped"]),
        has_masks="mask" in reader.info.features,
        build_dir=Path(reader.data_dir))
