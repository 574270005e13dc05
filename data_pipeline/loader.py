"""The Grain input pipeline: one split of a source -> shuffled, preprocessed, batched examples.

Grain's `DataLoader` does the heavy lifting: worker processes, and an iterator whose
`get_state()`/`set_state()` resume the exact order. `EpochShuffleSampler` orders the records
(a global shuffle per epoch, repeat) and gives every record of every epoch its own seeded
generator, so host augmentation (`RandomMap`) is identical for any worker count. With several
JAX processes `ProcessBlockSampler` gives each its block of every global batch (the role of
Grain's `ShardByJaxProcess`, which strides records instead and drops the remainder).

Preprocessing runs in two parts. The host part (decode, equalise, lung mask, resize to uint8,
`array_cache.prepare_image`) is read from the decode-once array store when the source is a
built dataset's (`cache_arrays=True`, the default), and computed per example otherwise. The
rest, `finish` (gray -> C channels, normalisation to float32), runs per batch (per example when
augmenting on the host), or on the device for a loader made with `finish_on_host=False`. Both
paths give identical batches.

By default training augments on device (`data_pipeline.augment.DEFAULT_ON_DEVICE`); pass
`augment=AugmentConfig(...)` to augment in the workers instead.
"""

from __future__ import annotations

import hashlib
import sys
from typing import Any

import grain
import jax
import numpy as np
from absl import flags

from data_pipeline import array_cache
from data_pipeline.augment import AugmentConfig, augment_image
from data_pipeline.preprocess import PreprocessConfig, normalize

PAD = -1   # the "index" of a padding example (ProcessBlockSampler's evaluation padding)


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
        index = self._indices[i]
        return {**self._source[int(index)], "index": index}

    def __repr__(self) -> str:
        digest = hashlib.sha1(self._indices.tobytes()).hexdigest()[:16]
        return f"SubsetSource({self._source!r}, n={len(self)}, indices_sha1={digest})"


class EpochShuffleSampler:
    """Grain sampler: position p of epoch e reads record `order_e[p]`, where `order_e` is a
    NumPy permutation seeded by (seed, e), drawn once per epoch (Grain's `IndexSampler` runs an
    `index_shuffle` per record, about 0.3 ms, which alone caps a loader near 3,000 records/s
    per core). With `rngs` every position gets its own generator, Philox(seed + position), as
    with `IndexSampler` (for host augmentation; making one costs tens of microseconds).
    Without `shuffle` each epoch is in order.

    `epoch_records` (default `num_records`) sets how many positions make one epoch: the
    positions read one stream of permutations, so an epoch of more records than there are
    starts the next permutation and one of fewer leaves the rest of its permutation to the
    next epoch (every member of an ensemble trains the same steps per epoch on its own
    examples)."""

    def __init__(self, num_records: int, *, shuffle: bool, seed: int, num_epochs: int | None,
                 rngs: bool, epoch_records: int | None = None):
        if epoch_records is not None and epoch_records < 1:
            raise ValueError(f"epoch_records must be >= 1, got {epoch_records}")
        self._num_records, self._shuffle = num_records, shuffle
        self._seed, self._num_epochs, self._rngs = seed, num_epochs, rngs
        self._epoch_records = num_records if epoch_records is None else epoch_records
        self._order: tuple[int, np.ndarray] | None = None   # (epoch, permutation)

    def __len__(self) -> int:
        return (sys.maxsize if self._num_epochs is None
                else self._epoch_records * self._num_epochs)

    def __getitem__(self, index: int) -> grain.RecordMetadata:
        if not 0 <= index < len(self):
            raise IndexError(f"position {index} is outside [0, {len(self)})")
        epoch, position = divmod(index, self._num_records)
        key = self._permutation(epoch)[position] if self._shuffle else position
        rng = np.random.Generator(np.random.Philox(key=self._seed + index)) if self._rngs else None
        return grain.RecordMetadata(index=index, record_key=int(key), rng=rng)

    def _permutation(self, epoch: int) -> np.ndarray:
        cached = self._order   # one read: reader threads may replace it meanwhile
        if cached is None or cached[0] != epoch:
            rng = np.random.default_rng([self._seed, epoch])
            cached = self._order = (epoch, rng.permutation(self._num_records))
        return cached[1]

    def __repr__(self) -> str:
        # epoch_records only when it differs: checkpoints compare this text on resume
        extra = ("" if self._epoch_records == self._num_records
                 else f", epoch_records={self._epoch_records}")
        return (f"EpochShuffleSampler(num_records={self._num_records}, shuffle={self._shuffle}, "
                f"seed={self._seed}, num_epochs={self._num_epochs}{extra})")


class PaddedSource:
    """`source` and one more record at its end, the padding `ProcessBlockSampler` reads: the
    last example again, with index PAD. (Grain wraps a record key past the end around, so
    the padding needs a record of its own.)"""

    def __init__(self, source: SubsetSource):
        self._source = source

    def __len__(self) -> int:
        return len(self._source) + 1

    def __getitem__(self, i: int) -> dict[str, Any]:
        if i < len(self._source):
            return self._source[i]
        return {**self._source[len(self._source) - 1], "index": np.int64(PAD)}

    def __repr__(self) -> str:
        return f"PaddedSource({self._source!r})"


class ProcessBlockSampler:
    """Process `process` of `count`'s block of every global batch of `batch_size` positions
    of `sampler`: local position i reads global position (i // b) * B + process * b + i % b
    (b = B / count), so the processes' local batches k, concatenated in process order, are
    exactly the global batch k one process reads, and a step sees the same examples on the
    same devices for any process count. With `pad` the last global batch is completed with
    padding (record `num_records` of a `PaddedSource`: index PAD), so every process yields
    the same number of full batches (evaluation: the caller drops the PAD rows); without it a
    last partial global batch is dropped (training)."""

    def __init__(self, sampler: EpochShuffleSampler, *, batch_size: int, process: int,
                 count: int, pad: bool, num_records: int):
        if batch_size % count:
            raise ValueError(f"the global batch size {batch_size} does not divide by the "
                             f"{count} processes; choose a multiple of {count}")
        self._sampler, self._batch, self._local = sampler, batch_size, batch_size // count
        self._process, self._count, self._pad = process, count, pad
        self._num_records = num_records

    def __len__(self) -> int:
        size = len(self._sampler)
        batches = -(-size // self._batch) if self._pad else size // self._batch
        return batches * self._local

    def __getitem__(self, index: int) -> grain.RecordMetadata:
        if not 0 <= index < len(self):
            raise IndexError(f"position {index} is outside [0, {len(self)})")
        batch, offset = divmod(index, self._local)
        position = batch * self._batch + self._process * self._local + offset
        if position >= len(self._sampler):
            return grain.RecordMetadata(index=index, record_key=self._num_records)
        meta = self._sampler[position]
        return grain.RecordMetadata(index=index, record_key=meta.record_key, rng=meta.rng)

    def __repr__(self) -> str:
        return (f"ProcessBlockSampler({self._sampler!r}, batch_size={self._batch}, "
                f"process={self._process}, count={self._count}, pad={self._pad})")


def finish(images, cfg: PreprocessConfig):
    """uint8 images [..., S, S, 1] -> float32 [..., S, S, C]: channels repeated, normalised.

    Elementwise, so a batch gives what its examples give one by one. Takes NumPy or JAX
    arrays (inside `jax.jit` too): on the device it matches the host to float32 rounding."""
    x = images.astype(np.float32)
    if cfg.channels > 1:
        x = x[..., [0] * cfg.channels]
    return normalize(x, cfg)


class PrepareMap(grain.transforms.Map):
    """Decoded example -> {"image": uint8 [S, S, 1], "label": int32, "index": int64}, as the
    array store holds it (the path for sources without a store)."""

    def __init__(self, cfg: PreprocessConfig):
        self.cfg = cfg

    def map(self, example: dict[str, Any]) -> dict[str, Any]:
        image = array_cache.prepare_image(example["image"], self.cfg, mask=example.get("mask"))
        return {"image": image, "label": np.int32(example["label"]),
                "index": np.int64(example["index"])}


class FinishMap(grain.transforms.Map):
    """`finish` on the images of an example or a batch."""

    def __init__(self, cfg: PreprocessConfig):
        self.cfg = cfg

    def map(self, example: dict[str, Any]) -> dict[str, Any]:
        return {**example, "image": finish(example["image"], self.cfg)}


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
                shard_by_process: bool = True, cache_arrays: bool = True,
                finish_on_host: bool = True, epoch_records: int | None = None
                ) -> grain.DataLoader:
    """A Grain DataLoader over `source[indices]` yielding batches of
    {"image": float32 [B, S, S, C], "label": int32 [B], "index": int64 [B]}; with
    `finish_on_host=False` images stay uint8 [B, S, S, 1] (a quarter of the bytes to move, or
    a twelfth for C = 3) for the consumer to `finish` on the device.

    `index` is the example's position in `source`, so predictions map back to patient ids.
    Shuffling is global per epoch and deterministic by `seed`; `num_epochs=None` repeats
    forever. Batches may span an epoch boundary. `epoch_records` makes an epoch that many
    draws from a stream of per-epoch permutations instead of one pass
    (`EpochShuffleSampler`). With `shard_by_process` each JAX process reads
    its block of every global batch of `batch_size` (`ProcessBlockSampler`: batches of
    batch_size / process_count); with drop_remainder=False the processes' last batches are
    padded to full size with examples of index PAD (-1), which the consumer drops after
    gathering. For evaluation use shuffle=False, drop_remainder=False: every index once, in
    order (with several processes, once over all processes).
    With `cache_arrays` a built dataset's source is read from its decode-once array store
    (`data_pipeline.array_cache`, built here on first use); False decodes every example of
    every epoch, as sources without a store always do.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be a non-negative 32-bit integer, got {seed}")
    if not isinstance(preprocess, PreprocessConfig):
        raise TypeError(f"preprocess must be a PreprocessConfig, got {type(preprocess).__name__}")
    if augment is not None and not finish_on_host:
        raise ValueError("host augmentation needs finished images: finish_on_host=True")
    indices = _check_indices(indices, len(source))
    arrays = array_cache.cached_source(source, preprocess) if cache_arrays else None
    subset = SubsetSource(source if arrays is None else arrays, indices)
    sampler = EpochShuffleSampler(len(subset), shuffle=shuffle, seed=int(seed),
                                  num_epochs=num_epochs, rngs=augment is not None,
                                  epoch_records=epoch_records)
    process, count = jax.process_index(), jax.process_count()
    if shard_by_process and count > 1:
        sampler = ProcessBlockSampler(sampler, batch_size=batch_size, process=process,
                                      count=count, pad=not drop_remainder,
                                      num_records=len(subset))
        subset = subset if drop_remainder else PaddedSource(subset)
        batch_size //= count
    if worker_count > 0:
        _allow_worker_processes()
    operations: list[grain.transforms.Transformation] = (
        [PrepareMap(preprocess)] if arrays is None else [])
    batch = grain.transforms.Batch(batch_size=batch_size, drop_remainder=drop_remainder)
    if augment is not None:
        operations += [FinishMap(preprocess), AugmentMap(augment), batch]
    else:
        operations += [batch, FinishMap(preprocess)] if finish_on_host else [batch]
    # Reading the store is a memory copy: reader threads (and the scan of their 500-record
    # buffer on every record) would cost more than they save.
    read_options = grain.ReadOptions(num_threads=0) if arrays is not None else None
    return grain.DataLoader(data_source=subset, sampler=sampler, operations=operations,
                            worker_count=worker_count,
                            shard_options=grain.sharding.NoSharding(),
                            read_options=read_options)


def pad_batch(images: np.ndarray, size: int) -> np.ndarray:
    """Pad a short last batch to `size` by repeating its last image (outputs are cut after),
    so evaluation compiles one shape."""
    if len(images) >= size:
        return images
    return np.concatenate([images, np.repeat(images[-1:], size - len(images), axis=0)])
