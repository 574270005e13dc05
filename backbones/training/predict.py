"""The engine's one predict loop over evaluation batches, and its two callers.

`predict_batches` is the loop: it pads a short last batch to the first batch's size (one
compiled shape), asks `forward` for every member's rows of the batch, gathers every process's
labels and example indices, and drops the loader's padding rows (index -1). What differs
between callers is only how a padded batch becomes rows, so that is the `forward` they pass:

- `predict_logits` (the training loop's validation): one wrapped predict function over the
  replicated state; with several processes each process's share becomes one global batch on
  `sharding`, and the global logits are read back whole.
- `member_logits` (a finished run's members, `ensembles.bundle.runtime`): groups of vmapped
  members applied by each process to its own share on its own devices; the rows of all
  processes are gathered on the row axis.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from tqdm.auto import tqdm

from backbones.training import distributed
from data_pipeline.loader import PAD, pad_batch
from data_pipeline.prefetch import to_global

# forward(padded images [size, ...], n real rows of this process) -> one array per member,
# [rows, C_m]: the batch's rows of every process (padding rows of the loader included)
Forward = Callable[[np.ndarray, int], Sequence[np.ndarray]]


def predict_batches(forward: Forward, batches: Iterable[dict], *, progress: str | None = None
                    ) -> tuple[list[np.ndarray], np.ndarray, np.ndarray] | None:
    """Per-member outputs [N, C_m] (member order of `forward`), labels [N] and example
    indices [N] over one pass of `batches` ({"image", "label"?, "index"?}), every process's
    rows in process order and the loader's padding dropped; None when there is no batch.
    `progress` names a transient bar (none when None; only process 0 shows one)."""
    out: list[list[np.ndarray]] | None = None
    labels, indices, size = [], [], None
    total = len(batches) if hasattr(batches, "__len__") else None
    for batch in tqdm(batches, desc=progress, total=total, leave=False,
                      disable=progress is None or not distributed.is_primary()):
        images = np.asarray(batch["image"])
        size, n = size or len(images), len(images)
        rows = forward(pad_batch(images, size), n)                 # one compiled shape
        if out is None:
            out = [[] for _ in rows]
        for member, r in zip(out, rows, strict=True):
            member.append(np.asarray(r))
        labels.append(distributed.gather(np.asarray(batch.get("label", np.zeros(n, np.int64)))))
        indices.append(distributed.gather(np.asarray(batch.get("index", np.zeros(n, np.int64)))))
    if out is None:
        return None
    keep = np.concatenate(indices) != PAD
    return ([np.concatenate(o)[keep] for o in out], np.concatenate(labels)[keep],
            np.concatenate(indices)[keep])


def predict_logits(predict: Callable, state: Any, batches: Iterable[dict], *,
                   progress: str | None = None, sharding: NamedSharding | None = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Logits [M, N, C], labels [N] and example indices [N] over one pass of `batches`.

    `predict(state, {"image"})` returns [M, B, C]. With several processes each process passes
    its share of every batch (a loader's block, padded to full size with examples of index
    -1): the shares become one global batch on `sharding`, and the logits, labels and indices
    of all processes come back on every process with the padding dropped, so the result is
    one process's."""
    def forward(images: np.ndarray, n: int) -> np.ndarray:
        size = len(images)                   # this process's padded share, before going global
        if sharding is not None and not sharding.is_fully_addressable:
            images = to_global(images, sharding)
        out = distributed.gather(predict(state, {"image": images}))
        return out[:, :n] if n < size else out    # several processes: always full

    result = predict_batches(forward, batches, progress=progress)
    if result is None:
        return np.zeros((0, 0, 0)), np.zeros(0, np.int64), np.zeros(0, np.int64)
    logits, labels, indices = result
    return np.stack(logits), labels, indices


def stacked_apply(model) -> Callable:
    """jit(vmap(apply)) over a member axis of the variables: images [B,...] -> logits [M,B,C]."""
    return jax.jit(jax.vmap(lambda v, x: model.apply(v, x, train=False), in_axes=(0, None)))


def member_logits(apply_fns: Sequence[Callable], variables: Sequence[dict],
                  groups: Sequence[Sequence[int]], batches: Iterable[dict],
                  progress: str | None = None
                  ) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Per-member logits [N, C_m] in member order, plus labels and example indices.

    Each batch is {"image", "label", "index"} (an evaluation loader); group g holds the members
    `groups[g]` and runs `apply_fns[g](variables[g], images)`. With several processes each runs
    its share of every batch (the loader's block, padded with index -1) on its own devices;
    the rows of all processes are gathered and the padding dropped, so every process returns
    the outputs one process would.
    """
    order = np.argsort(np.concatenate([np.asarray(g, np.int64) for g in groups]))

    def forward(images: np.ndarray, n: int) -> list[np.ndarray]:
        padded = jnp.asarray(images)
        rows = []
        for apply, v in zip(apply_fns, variables, strict=True):
            logits = np.asarray(apply(v, padded))[:, :n]                     # [M_g, n, C]
            logits = distributed.gather(logits.swapaxes(0, 1)).swapaxes(0, 1)
            rows.extend(logits)
        return [rows[i] for i in order]                                      # member order

    result = predict_batches(forward, batches, progress=progress)
    if result is None:
        raise ValueError("no images to predict")
    logits, labels, indices = result
    return [z.astype(np.float64) for z in logits], labels, indices
