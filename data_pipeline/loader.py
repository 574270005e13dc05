"""The Grain input pipeline: one split of a source -> shuffled, preprocessed, batched examples.

Grain's `DataLoader` does the heavy lifting: an `IndexSampler` over the split (global shuffle
per epoch, repeat), sharding per JAX process, worker processes, and an iterator whose
`get_state()`/`set_state()` resume the exact order. Randomness is per record: the sampler
gives every record of every epoch its own seeded generator, so host augmentation
(`RandomMap`) is identical for any worker count.

By default training augments on device (`data_pipeline.augment.DEFAULT_ON_DEVICE`), so the
loader only decodes (the source does) and preprocesses; pass `augment=AugmentConfig(...)` to
augment in the workers instead.
"""

from __future__ import annotations

import hashlib
from typing import Any

import grain
import numpy as np
from absl import flags

from data_pipeline.augment import AugmentConfig, augment_image
from data_pipeline.preprocess import PreprocessConfig, preprocess as preprocess_image


class SubsetSource:
    """Random access to `source` restricted to `indices`; each example gains its "index".

    The repr names the source and a digest of the indices, which Grain compares when an
    iterator state is restored (a state from another split is refused).
    """

    def __init__(self, source, indices: np.ndarray):
        self._source = source
        self._indices = indices

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        index = int(self._indices[i])
        return {**self._source[index], "index": index}

    def __repr__(self) -> str:
        digest = hashlib.sha1(self._indices.tobytes()).hexdigest()[:16]
        return f"SubsetSource({self._source!r}, n={len(self)}, indices_sha1={digest})"


class PreprocessMap(grain.transforms.Map):
    """Decoded example -> {"image": float32 [S, S, C], "label": int32, "index": int64}."""

    def __init__(self, cfg: PreprocessConfig):
        self.cfg = cfg

    def map(self, example: dict[str, Any]) -> dict[str, Any]:
        image = preprocess_image(example["image"], self.cfg, mask=example.get("mask"))
        return {"image": image, "label": np.int32(example["label"]),
                "index": np.int64(example["index"])}


class AugmentMap(grain.transforms.RandomMap):
    """Host augmentation with the record's own generator (deterministic for any worker count)."""

    def __init__(self, cfg: AugmentConfig):
        self.cfg = cfg

    def random_map(self, example: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        return {**example, "image": augment_image(example["image"], rng, self.cfg)}


def _check_indices(indices, n: int) -> np.ndarray:
    indices = np.asarray(indices)
    if indices.ndim != 1 or len(indices) == 0 or not np.issubdtype(indices.dtype, np.integer):
        raise ValueError(f"indices must be a non-empty 1-D integer array, got "
                         f"{indices.dtype} {indices.shape}")
    if indices.min() < 0 or indices.max() >= n:
        raise ValueError(f"indices must lie in [0, {n}) for this source, got "
                         f"[{indices.min()}, {indices.max()}]")
    return indices.astype(np.int64)


def _allow_worker_processes() -> None:
    """Work around google/grain#1355 (fixed after grain 0.2.18): with JAX imported, starting
    workers reads an absl flag and fails unless flags were parsed. Outside an absl app we
    mark them parsed, which leaves every flag at its default; a parsed app is untouched."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_loader(source, indices, *, batch_size: int, preprocess: PreprocessConfig,
                augment: AugmentConfig | None = None, shuffle: bool = True, seed: int = 0,
                num_epochs: int | None = 1, drop_remainder: bool = True, worker_count: int = 0,
                shard_by_process: bool = True) -> grain.DataLoader:
    """A Grain DataLoader over `source[indices]` yielding batches of
    {"image": float32 [B, S, S, C], "label": int32 [B], "index": int64 [B]}.

    `index` is the example's position in `source`, so predictions map back to patient ids.
    Shuffling is global per epoch and deterministic by `seed`; `num_epochs=None` repeats
    forever. Batches may span an epoch boundary. With `shard_by_process` each JAX process reads
    every process_count-th record (the last few records are dropped when the count does not
    divide). For evaluation use shuffle=False, drop_remainder=False: every index once, in order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be a non-negative 32-bit integer, got {seed}")
    if not isinstance(preprocess, PreprocessConfig):
        raise TypeError(f"preprocess must be a PreprocessConfig, got {type(preprocess).__name__}")
    subset = SubsetSource(source, _check_indices(indices, len(source)))
    sampler = grain.samplers.IndexSampler(
        num_records=len(subset), shuffle=shuffle, seed=int(seed), num_epochs=num_epochs,
        shard_options=grain.sharding.NoSharding())
    shard_options = (grain.sharding.ShardByJaxProcess(drop_remainder=True) if shard_by_process
                     else grain.sharding.NoSharding())
    if worker_count > 0:
        _allow_worker_processes()
    operations: list[grain.transforms.Transformation] = [PreprocessMap(preprocess)]
    if augment is not None:
        operations.append(AugmentMap(augment))
    operations.append(grain.transforms.Batch(batch_size=batch_size,
                                             drop_remainder=drop_remainder))
    return grain.DataLoader(data_source=subset, sampler=sampler, operations=operations,
                            worker_count=worker_count, shard_options=shard_options)
