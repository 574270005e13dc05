"""Per-class operating thresholds, chosen on validation and applied to K-class probabilities.

Each class k is read one-vs-rest on the model's probability p_k: an image is *flagged* for k
when p_k >= t_k. The multi-class decision (the combiner's rule) is unchanged; the flags are
what a reader acting at a chosen sensitivity or specificity uses (as torchxrayvision's
per-pathology operating thresholds). t_k is chosen on the validation split for a target:

- `sensitivity=S`: the largest t_k whose validation sensitivity is >= S (the most
  specificity that still meets S);
- `specificity=S`: the smallest t_k whose validation specificity is >= S (the most
  sensitivity that still meets S);
- `youden`: the t_k maximising sensitivity + specificity - 1 (Youden's J).

A class with no positive or no negative validation example gets no threshold (None): it is
never flagged, and its rates are reported as not available. The candidate thresholds are
scikit-learn's `roc_curve` thresholds (every distinct validation score).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import roc_curve

from ensembles.config import OperatingPoint


def _threshold(positive: np.ndarray, scores: np.ndarray, op: OperatingPoint) -> float | None:
    if positive.all() or not positive.any():
        return None
    fpr, tpr, thresholds = roc_curve(positive, scores, drop_intermediate=False)
    fpr, tpr, thresholds = fpr[1:], tpr[1:], thresholds[1:]   # drop roc_curve's +inf start
    if op.target == "sensitivity":
        i = int(np.argmax(tpr >= op.value - 1e-12))           # first = largest threshold
    elif op.target == "specificity":
        ok = np.flatnonzero(1 - fpr >= op.value - 1e-12)
        if len(ok) == 0:                                      # no score meets it: flag none
            return float(np.nextafter(scores.max(), np.inf))
        i = int(ok[-1])                                       # last = smallest threshold
    else:
        i = int(np.argmax(tpr - fpr))
    return float(thresholds[i])


def choose_thresholds(y: np.ndarray, proba: np.ndarray, op: OperatingPoint
                      ) -> list[float | None]:
    """One threshold per class (None where validation lacks positives or negatives)."""
    y, proba = np.asarray(y), np.asarray(proba, dtype=np.float64)
    return [_threshold(y == k, proba[:, k], op) for k in range(proba.shape[1])]


def flag(proba: np.ndarray, thresholds: Sequence[float | None]) -> np.ndarray:
    """[N, K] booleans: p_k >= t_k (never for a class without a threshold)."""
    t = np.array([np.inf if v is None else v for v in thresholds], dtype=np.float64)
    return np.asarray(proba, dtype=np.float64) >= t
