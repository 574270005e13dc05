"""Inference over an evaluation loader for groups of vmapped members: logits per member, with
every process's rows gathered and the loader's padding dropped."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from backbones.training import distributed
from data_pipeline.loader import PAD, pad_batch


def stacked_apply(model) -> Callable:
    """jit(vmap(apply)) over a member axis of the variables: images [B,...] -> logits [M,B,C]."""
    return jax.jit(jax.vmap(lambda v, x: model.apply(v, x, train=False), in_axes=(0, None)))


def member_logits(apply_fns: Sequence[Callable], variables: Sequence[dict],
                  groups: Sequence[Sequence[int]], batches: Iterable[dict]
                  ) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Per-member logits [N, C_m] in member order, plus labels and example indices.

    Each batch is {"image", "label", "index"} (an evaluation loader); group g holds the members
    `groups[g]` and runs `apply_fns[g](variables[g], images)`. With several processes each runs
    its share of every batch (the loader's block, padded with index -1) on its own devices;
    the rows of all processes are gathered and the padding dropped, so every process returns
    the outputs one process would.
    """
    num_members = sum(len(g) for g in groups)
    out: list[list[np.ndarray]] = [[] for _ in range(num_members)]
    labels, indices, size = [], [], None
    for batch in batches:
        images = np.asarray(batch["image"])
        size = size or len(images)
        n = len(images)
        padded = jnp.asarray(pad_batch(images, size))         # one compiled shape
        for apply, v, members in zip(apply_fns, variables, groups, strict=True):
            logits = np.asarray(apply(v, padded))[:, :n]                     # [M_g, n, C]
            logits = distributed.gather(logits.swapaxes(0, 1)).swapaxes(0, 1)
            for i, m in enumerate(members):
                out[m].append(logits[i])
        labels.append(distributed.gather(batch.get("label", np.zeros(n, np.int64))))
        indices.append(distributed.gather(batch.get("index", np.zeros(n, np.int64))))
    if not labels:
        raise ValueError("no images to predict")
    keep = np.concatenate(indices) != PAD
    return ([np.concatenate(o)[keep].astype(np.float64) for o in out],
            np.concatenate(labels)[keep], np.concatenate(indices)[keep])
