"""Training the lung segmenter: a U-Net on the masks a dataset ships, measured by Dice on the
held-out test split and saved as a bundle (`ensembles.bundle.segmenter` loads and runs it)."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from backbones import unet
from data_pipeline import array_cache
from data_pipeline.datasets import Dataset
from data_pipeline.preprocess import PreprocessConfig
from data_pipeline.splits import split_indices
from ensembles.bundle.integrity import manifest
from ensembles.bundle.segmenter import (
    CONFIG_FILE,
    FORMAT_VERSION,
    PARAMS_DIR,
    THRESHOLD,
    Segmenter,
    SegmenterConfig,
    prepared,
)
from ensembles.config import ConfigError
from ensembles.training import runs


def dice(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per-image Dice 2|A n B| / (|A| + |B|) of boolean masks [N, ...]; 1 where both are empty."""
    pred = np.asarray(pred, bool).reshape(len(pred), -1)
    target = np.asarray(target, bool).reshape(len(target), -1)
    inter, total = (pred & target).sum(1), pred.sum(1) + target.sum(1)
    return np.where(total == 0, 1.0, 2.0 * inter / np.maximum(total, 1))


class _MasksAsImages:
    """A source's shipped masks as the "image" of each example, so the decode-once store
    resizes (and caches) them exactly as it does the images."""

    def __init__(self, source):
        self._source = source
        arrays_dir = getattr(source, "arrays_dir", None)
        self.arrays_dir = None if arrays_dir is None else Path(arrays_dir) / "shipped-masks"

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._swap(self._source[index])

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        return [self._swap(e) for e in self._source.__getitems__(indices)]

    @staticmethod
    def _swap(example: dict[str, Any]) -> dict[str, Any]:
        return {**example, "image": example["mask"]}

    def __repr__(self) -> str:
        return f"_MasksAsImages({self._source!r})"


def _arrays(source, cfg: PreprocessConfig) -> np.ndarray:
    """uint8 [N, S, S, 1] prepared examples of `source` (from its store when it has one)."""
    store = array_cache.cached_source(source, cfg)
    if store is not None:
        return np.asarray(store.images)
    return prepared([source[i]["image"] for i in range(len(source))], cfg)


def training_arrays(dataset: Dataset, config: SegmenterConfig) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, S, S, 1], lung masks bool [N, S, S]) at the segmenter's size;
    ValueError when the dataset ships no masks."""
    if not dataset.has_masks:
        raise ConfigError(f"dataset {dataset.name} ships no lung masks to train a segmenter on "
                          f"(Kaggle v4's masks/ or synthetic_cxr do)")
    images = _arrays(dataset.source, config.preprocess)
    masks = _arrays(_MasksAsImages(dataset.source), config.preprocess)[..., 0] > THRESHOLD * 255
    return images, masks


def _loss(model, params, batch_stats, x, y):
    """Binary cross-entropy + (1 - soft Dice): the first learns every pixel, the second the
    overlap whatever the lung's share of the image."""
    logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                  mutable=["batch_stats"])
    z = logits[..., 0]
    p = jax.nn.sigmoid(z)
    soft_dice = (2 * (p * y).sum((1, 2)) + 1) / (p.sum((1, 2)) + y.sum((1, 2)) + 1)
    loss = optax.sigmoid_binary_cross_entropy(z, y).mean() + 1 - soft_dice.mean()
    return loss, updates["batch_stats"]


def constant_mask_baselines(train_masks: np.ndarray, test_masks: np.ndarray) -> dict[str, float]:
    """Mean test Dice of the trivial masks: everything lung, and the best constant mask (the
    training masks' pixel frequency thresholded where it does best on the training masks)."""
    freq = train_masks.mean(0)
    best = max(np.linspace(0.05, 0.95, 19),
               key=lambda t: dice(np.broadcast_to(freq >= t, train_masks.shape),
                                  train_masks).mean())
    return {"all_lung": float(dice(np.ones_like(test_masks), test_masks).mean()),
            "constant_mask": float(dice(np.broadcast_to(freq >= best, test_masks.shape),
                                        test_masks).mean())}


def train_segmenter(dataset: Dataset, config: SegmenterConfig = SegmenterConfig(), *,
                    out: str | Path, progress: bool = True) -> tuple[Segmenter, dict]:
    """Train on the training split's shipped masks, keep the epoch of best validation Dice,
    measure Dice on the held-out test split and write the bundle into `out` (a new or empty
    folder). Returns (the segmenter, metrics)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} exists and is not an empty folder")
    images, masks = training_arrays(dataset, config)
    splits = split_indices(dataset.labels, dataset.patient_ids, recipe=config.split_recipe,
                           seed=config.seed)
    train = splits["train"]
    if len(train) < config.batch_size:
        raise ConfigError(f"the training split has {len(train)} examples, fewer than one batch "
                          f"of {config.batch_size}")
    model = unet.create(width=config.width, levels=config.levels)
    key = jax.random.PRNGKey(config.seed)
    s = config.image_size
    variables = model.init(key, jnp.zeros((1, s, s, 1)), train=False)
    tx = optax.adam(config.lr)
    params, stats = variables["params"], variables["batch_stats"]
    opt_state = tx.init(params)

    @jax.jit
    def step(params, stats, opt_state, x, y):
        (loss, stats), grads = jax.value_and_grad(
            lambda p: _loss(model, p, stats, x, y), has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state, loss

    segmenter = Segmenter(out.absolute(), config, variables, digest="")
    rng = np.random.default_rng(config.seed)
    steps = len(train) // config.batch_size
    best, best_dice, records = variables, -1.0, []
    for epoch in tqdm(range(1, config.epochs + 1), desc="segmenter", disable=not progress):
        order = rng.permutation(train)
        losses = []
        for b in range(steps):
            rows = np.sort(order[b * config.batch_size:(b + 1) * config.batch_size])
            params, stats, opt_state, loss = step(
                params, stats, opt_state, images[rows].astype(np.float32) / 255.0,
                masks[rows].astype(np.float32))
            losses.append(float(loss))
        segmenter.variables = {"params": params, "batch_stats": stats}
        val = _dice_on(segmenter, images, masks, splits["val"])
        records.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "val_dice": val})
        if val > best_dice:
            best, best_dice = segmenter.variables, val
    segmenter.variables = best
    test = splits["test"]
    metrics = {"dice": _dice_on(segmenter, images, masks, test), "test_images": len(test),
               "val_dice": best_dice, "best_epoch": 1 + int(np.argmax([r["val_dice"]
                                                                       for r in records])),
               "trivial": constant_mask_baselines(masks[train], masks[test]),
               "dataset": dataset.name, "split_sizes": {k: len(v) for k, v in splits.items()},
               "records": records}
    segmenter.digest = save_segmenter(out, segmenter, metrics)
    return segmenter, metrics


def _dice_on(segmenter: Segmenter, images: np.ndarray, masks: np.ndarray,
             rows: np.ndarray) -> float:
    """Mean Dice of the thresholded maps on images[rows] (at the segmenter's size)."""
    maps = segmenter.probability_maps(images[rows])
    return float(dice(maps > THRESHOLD * 255, masks[rows]).mean())


def save_segmenter(out: Path, segmenter: Segmenter, metrics: dict) -> str:
    """Write params/, metrics.json and (last, atomically) config.json; returns the digest."""
    out.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(out.absolute() / PARAMS_DIR, segmenter.variables, force=True)
    runs.write_json_atomic(out / "metrics.json", metrics)
    section = {"format_version": FORMAT_VERSION, "kind": "segmenter",
               "config": dataclasses.asdict(segmenter.config), "dataset": metrics["dataset"],
               "files": manifest(out, [PARAMS_DIR])}
    summary = {k: metrics[k] for k in ("dice", "test_images", "val_dice", "best_epoch",
                                       "trivial")}
    runs.write_json_atomic(out / CONFIG_FILE, {"segmenter": section, "metrics": summary})
    return hashlib.sha256((out / CONFIG_FILE).read_bytes()).hexdigest()


