"""Class balancing: resample a split's indices, or weight the loss per class.

Resampling changes which examples a training epoch sees (downsample every class to the
smallest, or oversample with replacement to the largest); class weights keep the data and
scale each example's loss instead (scikit-learn's "balanced" rule).
"""

from __future__ import annotations

import numpy as np
from sklearn.utils.class_weight import compute_class_weight

MODES: tuple[str, ...] = ("none", "downsample", "oversample")


def balance_indices(indices, labels, mode: str = "none", seed: int = 0) -> np.ndarray:
    """Resample `indices` so every class present among them has the same count.

    `labels` is the full per-example label array (e.g. `ds.labels`); `indices` index into it.
    "downsample": each class keeps a random subset the size of the smallest class.
    "oversample": each class keeps all its examples plus random repeats (with replacement)
    up to the size of the largest. "none": `indices` unchanged. Deterministic by `seed`;
    the result is sorted (the loader shuffles).
    """
    if mode not in MODES:
        raise ValueError(f"unknown balance mode {mode!r}; choose one of {', '.join(MODES)}")
    indices = np.asarray(indices, dtype=np.int64)
    labels = np.asarray(labels)
    if indices.ndim != 1:
        raise ValueError(f"indices must be 1-D, got shape {indices.shape}")
    if len(indices) and (indices.min() < 0 or indices.max() >= len(labels)):
        raise ValueError(f"indices must lie in [0, {len(labels)}), got "
                         f"[{indices.min()}, {indices.max()}]")
    if mode == "none" or len(indices) == 0:
        return indices.copy()
    rng = np.random.default_rng(seed)
    split_labels = labels[indices]
    classes, counts = np.unique(split_labels, return_counts=True)
    parts = []
    for c in classes:
        members = indices[split_labels == c]
        if mode == "downsample":
            parts.append(rng.choice(members, size=counts.min(), replace=False))
        else:
            extra = rng.choice(members, size=counts.max() - len(members), replace=True)
            parts.append(np.concatenate([members, extra]))
    return np.sort(np.concatenate(parts))


def class_weights(labels, num_classes: int) -> np.ndarray:
    """Per-class loss weights n / (K * count_k) as float32 [K] (sklearn's "balanced").

    Raises ValueError if a label lies outside [0, K) or a class has no examples (its
    weight would be infinite).
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) == 0:
        raise ValueError(f"labels must be a non-empty 1-D array, got shape {labels.shape}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got "
                         f"[{labels.min()}, {labels.max()}]")
    counts = np.bincount(labels, minlength=num_classes)
    if (counts == 0).any():
        missing = ", ".join(str(c) for c in np.flatnonzero(counts == 0))
        raise ValueError(f"class(es) {missing} have no examples; cannot weight them")
    weights = compute_class_weight("balanced", classes=np.arange(num_classes), y=labels)
    return weights.astype(np.float32)
