"""Lung segmentation for datasets without masks: train a U-Net on the masks a dataset ships,
save it as a bundle, and give any source the lung masks it predicts.

    seg, metrics = train_segmenter(load_dataset("synthetic_cxr", count=400), out="runs/seg")
    seg = load_segmenter("runs/seg")      # BundleError (one line) if missing or changed
    masked = seg.source(dataset.source)   # examples gain the predicted "mask"

A segmenter bundle:

    RUN/config.json   {"segmenter": {"format_version", "kind": "segmenter", "config"
                      (SegmenterConfig), "dataset", "files": SHA-256 manifest of params/},
                      "metrics": {...}}; written last, atomically
    RUN/params/       orbax checkpoint of the best epoch's {"params", "batch_stats"} (by
                      validation Dice)
    RUN/metrics.json  Dice on the held-out test split, the trivial masks' Dice, epoch records

Its digest is the SHA-256 of config.json (which holds the manifest of params/): a classifier
trained with `--lung-mask auto --segmenter RUN` records the path and this digest, and loading
it refuses a segmenter that is missing or changed.

Geometry: the segmenter sees an image as its PreprocessConfig makes it (padded to a square of
`image_size`, like the classifiers); the probability map is cropped back to the image's content
(the padding removed), resized bilinearly to the image's size and thresholded at 0.5, which
gives a 0/255 mask as a dataset ships it. Splits are patient-grouped (`split_indices`).

Where the masks are computed: for a built dataset (a source with `arrays_dir`) the probability
maps of every example are computed once per (dataset build, segmenter digest) and kept in
`<arrays_dir>/lung-masks-<digest[:16]>/maps/data/maps.npy` (built under a lock, renamed into
place when complete); the masked source's own decode-once stores live beside it in
`.../arrays/`, so masked images are cached per segmenter. Other sources (decoded files in
predict) are segmented on every call.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from PIL import Image
from tqdm.auto import tqdm

from backbones import unet
from data_pipeline import array_cache
from data_pipeline.datasets import INCOMPLETE_PREFIX, build_lock, remove_incomplete
from data_pipeline.per_example import get_examples
from data_pipeline.preprocess import PreprocessConfig
from data_pipeline.splits import RECIPES
from ensembles.bundle.integrity import manifest
from ensembles.bundle.schema import BundleError

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
THRESHOLD = 0.5
_PREDICT_BATCH = 32


@dataclasses.dataclass(frozen=True)
class SegmenterConfig:
    """The U-Net, its input size and how it is trained."""

    image_size: int = 64
    width: int = 16
    levels: int = 4
    epochs: int = 10
    batch_size: int = 16
    lr: float = 1e-3
    seed: int = 0
    split_recipe: str = "70/15/15"

    def __post_init__(self):
        for name in ("image_size", "width", "levels", "epochs", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"segmenter {name} must be an integer >= 1, got "
                                 f"{getattr(self, name)!r}")
        side = 2 ** (self.levels - 1)
        if self.image_size % side or self.image_size < 8:
            raise ValueError(f"segmenter image_size must be >= 8 and divisible by {side} "
                             f"({self.levels} levels), got {self.image_size}")
        if not 0 < self.lr <= 10:
            raise ValueError(f"segmenter lr must be in (0, 10], got {self.lr}")
        if self.split_recipe not in RECIPES:
            raise ValueError(f"split_recipe {self.split_recipe!r} is not one of "
                             f"{', '.join(RECIPES)}")

    @property
    def preprocess(self) -> PreprocessConfig:
        """How an image becomes the U-Net's input: padded square, 1 channel, [0, 1]."""
        return PreprocessConfig(image_size=self.image_size, channels=1, normalization="unit")


def fit_to_image(prob_map: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A uint8 [S, S] probability map (0-255) of a padded square -> uint8 0/255 mask
    [H, W, 1] of the image of `shape` (`preprocess.resize`'s "pad" geometry undone)."""
    h, w = shape
    size = prob_map.shape[0]
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    top, left = (size - nh) // 2, (size - nw) // 2
    content = prob_map[top:top + nh, left:left + nw].astype(np.float32)
    resized = np.asarray(Image.fromarray(content).resize((w, h), Image.Resampling.BILINEAR))
    return np.where(resized > THRESHOLD * 255, 255, 0).astype(np.uint8)[..., None]


class MaskedSource:
    """Random access to `source` whose examples carry the segmenter's "mask" (replacing any
    shipped one). `maps` is uint8 [N, S, S] (or the .npy file holding it, memory-mapped on
    first use, so Grain workers receive the path rather than a copy)."""

    def __init__(self, source, maps: np.ndarray | Path, digest: str,
                 arrays_dir: Path | None = None):
        self._source, self._maps, self.digest, self.arrays_dir = source, maps, digest, arrays_dir

    @property
    def maps(self) -> np.ndarray:
        if isinstance(self._maps, Path):
            self._maps = np.load(self._maps, mmap_mode="r")
        return self._maps

    def __len__(self) -> int:
        return len(self._source)

    def _masked(self, example: dict[str, Any], index: int) -> dict[str, Any]:
        image = np.asarray(example["image"])
        return {**example, "mask": fit_to_image(np.asarray(self.maps[index]), image.shape[:2])}

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._masked(self._source[int(index)], int(index))

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        indices = [int(i) for i in indices]
        return [self._masked(e, i) for e, i in zip(get_examples(self._source, indices), indices,
                                                   strict=True)]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if isinstance(state["_maps"], np.memmap):
            state["_maps"] = Path(state["_maps"].filename)
        return state

    def __repr__(self) -> str:
        return f"MaskedSource({self._source!r}, segmenter={self.digest[:16]})"


@dataclasses.dataclass
class Segmenter:
    """A loaded (or just trained) lung segmenter."""

    run_dir: Path
    config: SegmenterConfig
    variables: dict
    digest: str                     # SHA-256 of its config.json

    def __post_init__(self):
        model = unet.create(width=self.config.width, levels=self.config.levels)
        self._apply = jax.jit(lambda v, x: unet.probabilities(model.apply(v, x, train=False)))

    def reference(self) -> dict[str, str]:
        """What a classifier bundle records: {"path": absolute run folder, "sha256": digest}."""
        return {"path": str(self.run_dir), "sha256": self.digest}

    def probability_maps(self, prepared: np.ndarray, *, progress: bool = False) -> np.ndarray:
        """uint8 [N, S, S] maps (probability x 255) of prepared uint8 [N, S, S, 1] inputs, in
        batches of a fixed size (one compilation)."""
        n, out = len(prepared), np.empty((len(prepared), *prepared.shape[1:3]), np.uint8)
        for start in tqdm(range(0, n, _PREDICT_BATCH), desc="segmenting lungs",
                          disable=not progress):
            chunk = np.asarray(prepared[start:start + _PREDICT_BATCH], np.float32) / 255.0
            padded = np.concatenate([chunk, np.zeros((_PREDICT_BATCH - len(chunk),
                                                      *chunk.shape[1:]), np.float32)])
            p = np.asarray(self._apply(self.variables, padded))[:len(chunk)]
            out[start:start + len(chunk)] = np.rint(p * 255).astype(np.uint8)
        return out

    def masks(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """uint8 0/255 lung masks [H, W, 1] for raw uint8 HxWx1 images of any size."""
        maps = self.probability_maps(prepared(images, self.config.preprocess))
        return [fit_to_image(m, np.asarray(im).shape[:2]) for m, im in zip(maps, images,
                                                                            strict=True)]

    def source(self, source, *, progress: bool = False) -> MaskedSource:
        """`source` with the predicted masks (cached per dataset build; see the module doc)."""
        if isinstance(source, MaskedSource) and source.digest == self.digest:
            return source
        arrays_dir = getattr(source, "arrays_dir", None)
        if arrays_dir is None:
            images = [source[i]["image"] for i in range(len(source))]
            return MaskedSource(source, self.probability_maps(
                prepared(images, self.config.preprocess)), self.digest)
        folder = Path(arrays_dir) / f"lung-masks-{self.digest[:16]}"
        return MaskedSource(source, self._cached_maps(source, folder / "maps", progress),
                            self.digest, folder / "arrays")

    def _cached_maps(self, source, folder: Path, progress: bool) -> Path:
        data = folder / "data"
        if not data.is_dir():
            with build_lock(folder):
                if not data.is_dir():   # another process may have built it meanwhile
                    remove_incomplete(folder)
                    store = array_cache.cached_source(source, self.config.preprocess)
                    maps = self.probability_maps(store.images, progress=progress)
                    tmp = folder / f"{INCOMPLETE_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
                    tmp.mkdir(parents=True)
                    np.save(tmp / "maps.npy", maps)
                    os.rename(tmp, data)
        return data / "maps.npy"


def prepared(images: Sequence[np.ndarray], cfg: PreprocessConfig) -> np.ndarray:
    return np.stack([array_cache.prepare_image(np.asarray(im), cfg) for im in images])


def load_segmenter(run: str | Path, expected_digest: str | None = None) -> Segmenter:
    """The segmenter saved in `run`, after checking its files against the manifest (and its
    config.json against `expected_digest`, what a classifier recorded); BundleError (one
    line) when it is missing, not a segmenter, or changed."""
    run = Path(run)
    path = run / CONFIG_FILE
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise BundleError(f"segmenter {run}: cannot read {CONFIG_FILE} ({error.strerror})"
                          ) from None
    digest = hashlib.sha256(raw).hexdigest()
    if expected_digest is not None and digest != expected_digest:
        raise BundleError(f"segmenter {run} changed since this model was trained with it "
                          f"({CONFIG_FILE} digest {digest[:12]}, recorded {expected_digest[:12]})")
    try:
        section = json.loads(raw)["segmenter"]
        if section["kind"] != "segmenter" or section["format_version"] != FORMAT_VERSION:
            raise ValueError("another kind or format version")
        config = SegmenterConfig(**section["config"])
        files = section["files"]
    except (ValueError, KeyError, TypeError) as error:
        raise BundleError(f"{path} is not a segmenter bundle ({error})") from None
    if not (run / PARAMS_DIR).is_dir():
        raise BundleError(f"incomplete segmenter: {run / PARAMS_DIR} is missing")
    found = manifest(run, [PARAMS_DIR])
    for rel in sorted(set(found) | set(files)):
        if found.get(rel) != files.get(rel):
            raise BundleError(f"segmenter {run}: {rel} is missing, added or changed since it "
                              f"was saved")
    model = unet.create(width=config.width, levels=config.levels)
    s = config.image_size
    target = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, s, s, 1)),
                                               train=False))
    with ocp.StandardCheckpointer() as ckpt:
        variables = ckpt.restore((run / PARAMS_DIR).absolute(), target)
    return Segmenter(run.absolute(), config, variables, digest)
