"""Decode once: every image of a dataset split decoded, equalised, masked and resized to the
model's size a single time, kept as one memory-mapped uint8 array.

Decoding a PNG and resizing it costs milliseconds per example; after the first use of a
(dataset build, split, host preprocessing) combination, an epoch only slices uint8 arrays.
Normalisation and the gray -> C channel repeat run later, per batch (`loader`), and are not
part of the store, so one store serves every normalisation and channel count.

A store is a folder `<ExampleSource.arrays_dir>/<key>/data/` holding
  images.npy   uint8 [N, S, S, 1], read with `np.load(mmap_mode="r")` (larger than RAM is fine)
  labels.npy   int64 [N]
  ids.npy      str [N], each example's path (checks the store lines up with the source)
  manifest.json  key, count, shape and the options it was built with.
`arrays_dir` lies under `<cache>/arrays/<dataset>-<dataset key>/<split>/`, so a dataset whose
content or options changed (a new dataset key) gets new stores; `<key>` hashes
`STORE_VERSION`, the versions of the libraries that compute the pixels and the host
preprocessing options (`prepare_options`). A build holds `datasets.build_lock` on
`<key>.lock`, removes `incomplete.*` folders a killed build left (`datasets.remove_incomplete`),
writes into a fresh `incomplete.*` folder and renames it to `data/` when complete, so a
killed build never leaves a store that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import skimage
from tqdm.auto import tqdm

from data_pipeline.datasets import INCOMPLETE_PREFIX, build_lock, remove_incomplete
from data_pipeline.preprocess import (
    PreprocessConfig,
    _check_uint8_hw1,
    apply_lung_mask,
    equalize,
    resize,
)

STORE_VERSION = 1   # bump when prepare_image changes what it computes
_CHUNK = 256        # examples read per `__getitems__` call while building


def prepare_image(image: np.ndarray, cfg: PreprocessConfig,
                  mask: np.ndarray | None = None) -> np.ndarray:
    """The host part of `preprocess.preprocess` -- equalisation, lung mask, resize -- as
    uint8 [S, S, 1] (rounded): what a store holds, and what the decode path computes."""
    _check_uint8_hw1(image, "image")
    x = equalize(image[..., 0], cfg)
    if cfg.lung_mask:
        if mask is None:
            raise ValueError("cfg.lung_mask is set but no mask was given for this image")
        _check_uint8_hw1(mask, "mask")
        x = apply_lung_mask(x, mask[..., 0])
    x = resize(x, cfg.image_size, cfg.resize)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)[..., None]


def prepare_options(cfg: PreprocessConfig) -> dict[str, Any]:
    """The options of `cfg` that change what `prepare_image` computes (and nothing else)."""
    equalisation = ({"clahe_clip": cfg.clahe_clip} if cfg.clahe else
                    {"local_equalize_radius": cfg.local_equalize_radius}
                    if cfg.local_equalize else None)
    return {"image_size": cfg.image_size, "resize": cfg.resize, "equalize": equalisation,
            "lung_mask": cfg.lung_mask}


def store_key(cfg: PreprocessConfig) -> str:
    """Hash of the store format, the pixel libraries' versions and `prepare_options(cfg)`."""
    payload = {"version": STORE_VERSION, "pillow": PIL.__version__,
               "skimage": skimage.__version__, "options": prepare_options(cfg)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


class ArraySource:
    """Grain random-access source over a complete store: {"image": uint8 [S, S, 1],
    "label": int32}.

    Opens the arrays lazily and pickles by folder, so Grain workers map the file rather than
    receive a copy. The repr is `stands_for`, the repr of the example source the store was
    built from: the example order is the same, so an iterator state saved by either path
    (or by a checkpoint from before the cache) restores on the other.
    """

    def __init__(self, folder: Path, count: int, stands_for: str):
        self.folder = folder
        self._count = count
        self._stands_for = stands_for
        self._images: np.ndarray | None = None
        self._labels: np.ndarray | None = None

    @property
    def images(self) -> np.ndarray:
        """The memory-mapped uint8 [N, S, S, 1] array."""
        if self._images is None:
            self._images = np.load(self.folder / "images.npy", mmap_mode="r")
        return self._images

    @property
    def labels(self) -> np.ndarray:
        if self._labels is None:
            self._labels = np.load(self.folder / "labels.npy").astype(np.int32)
        return self._labels

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": np.asarray(self.images[index]), "label": self.labels[index]}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_images": None, "_labels": None}

    def __repr__(self) -> str:
        return self._stands_for


def cached_source(source, cfg: PreprocessConfig, *, progress: bool = True
                  ) -> ArraySource | None:
    """The store of `source` for `cfg`, built on first use (under a lock, with a progress
    bar unless `progress` is False); None for a source without `arrays_dir` (in-memory
    examples, a bare TFDS source)."""
    arrays_dir = getattr(source, "arrays_dir", None)
    if arrays_dir is None:
        return None
    folder = Path(arrays_dir) / store_key(cfg)
    data = folder / "data"
    if not data.is_dir():
        with build_lock(folder):
            if not data.is_dir():   # another process may have built it while we waited
                remove_incomplete(folder)
                _build(source, cfg, folder, data, progress)
    manifest = json.loads((data / "manifest.json").read_text())
    shape = [len(source), cfg.image_size, cfg.image_size, 1]
    if manifest["shape"] != shape:
        raise RuntimeError(f"array store {data} holds {manifest['shape']}, expected {shape}; "
                           f"delete it and retry")
    return ArraySource(data, len(source), repr(source))


def _build(source, cfg: PreprocessConfig, folder: Path, data: Path, progress: bool) -> None:
    """Decode and prepare every example of `source` into `incomplete.*`, then rename to `data`."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"{INCOMPLETE_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()   # the umask's permissions (mkdtemp's 0700 would hide a shared cache)
    n, size = len(source), cfg.image_size
    images = np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=np.uint8,
                                       shape=(n, size, size, 1))
    labels, ids = np.empty(n, np.int64), []
    with tqdm(total=n, desc=f"caching {n} images at {size}px", unit="img",
              disable=not progress) as bar:
        for start in range(0, n, _CHUNK):
            stop = min(start + _CHUNK, n)
            for i, example in enumerate(source.__getitems__(range(start, stop)), start):
                images[i] = prepare_image(example["image"], cfg, example.get("mask"))
                labels[i] = example["label"]
                ids.append(example["path"])
            bar.update(stop - start)
    images.flush()
    del images
    np.save(tmp / "labels.npy", labels)
    np.save(tmp / "ids.npy", np.asarray(ids, dtype=str))
    manifest = {"key": folder.name, "count": n, "shape": [n, size, size, 1], "dtype": "uint8",
                "options": prepare_options(cfg), "version": STORE_VERSION, "source": repr(source)}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    for name in os.listdir(tmp):
        _fsync(tmp / name)
    os.rename(tmp, data)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def mean_std(source, indices, cfg: PreprocessConfig) -> tuple[tuple[float, ...],
                                                             tuple[float, ...]]:
    """Per-channel mean and std, on the [0, 1] scale, of source[indices] prepared by `cfg`
    (equalised, masked, resized, rounded to uint8: exactly what `finish` then normalises;
    the gray value is every channel's). Read from the decode-once store when the source has
    one; for normalization "dataset", computed on the training split only."""
    indices = np.sort(np.asarray(indices))
    if not len(indices):
        raise ValueError("mean_std needs at least one example")
    store = cached_source(source, cfg)
    total = total_sq = 0.0
    for start in range(0, len(indices), _CHUNK):
        rows = indices[start:start + _CHUNK]
        examples = [] if store is not None else [source[int(i)] for i in rows]
        x = (store.images[rows] if store is not None else np.stack(
            [prepare_image(e["image"], cfg, e.get("mask")) for e in examples]))
        x = x.astype(np.float64) / 255.0
        total, total_sq = total + x.sum(), total_sq + np.square(x).sum()
    count = len(indices) * cfg.image_size ** 2
    mean = total / count
    std = float(np.sqrt(max(total_sq / count - mean ** 2, 0.0)))
    return (float(mean),) * cfg.channels, (std,) * cfg.channels
