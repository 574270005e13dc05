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

import dataclasses
from collections.abc import Sequence

import numpy as np
from sklearn.metrics import roc_curve

from ensembles.evaluation import (bootstrap_weights, ci95, fmt_ci, markdown_table,
                                  resampling_units)

TARGETS = ("sensitivity", "specificity", "youden")


@dataclasses.dataclass(frozen=True)
class OperatingPoint:
    """What the per-class thresholds aim for: a target sensitivity or specificity, or Youden."""

    target: str = "youden"
    value: float | None = None

    def __str__(self) -> str:
        return self.target if self.value is None else f"{self.target}={self.value:g}"


def parse_operating_point(text: str) -> OperatingPoint:
    """`sensitivity=0.95`, `specificity=0.9` or `youden` -> OperatingPoint; ValueError else."""
    name, _, value = text.strip().partition("=")
    if name == "youden" and not value:
        return OperatingPoint("youden")
    if name in ("sensitivity", "specificity") and value:
        try:
            v = float(value)
        except ValueError:
            v = float("nan")
        if 0 < v <= 1:
            return OperatingPoint(name, v)
    raise ValueError(f"operating point {text!r} must be sensitivity=S or specificity=S with S "
                     f"in (0, 1], or youden")


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


def rates(y: np.ndarray, proba: np.ndarray, thresholds: Sequence[float | None],
          class_names: Sequence[str], *, patient_ids: np.ndarray | None = None, seed: int = 0,
          n_bootstrap: int = 1000) -> dict[str, dict]:
    """Per class: threshold, sensitivity and specificity of the flags on (y, proba), with
    95% percentile-bootstrap CIs over patients (as the metrics' CIs), and the counts."""
    y = np.asarray(y)
    flags = flag(proba, thresholds)
    units, _ = resampling_units(None if patient_ids is None else np.asarray(patient_ids), len(y))
    w = (np.concatenate(list(bootstrap_weights(units, n_bootstrap, seed))) if n_bootstrap
         else None)                                            # [B, N] resample weights
    out = {}
    for k, name in enumerate(class_names):
        pos, hit = y == k, flags[:, k]
        entry = {"threshold": thresholds[k], "positives": int(pos.sum()),
                 "negatives": int((~pos).sum())}
        for key, rows, want in (("sensitivity", pos, True), ("specificity", ~pos, False)):
            ok = (hit == want) & rows
            have = thresholds[k] is not None and rows.any()
            entry[key] = float(ok.sum() / rows.sum()) if have else None
            if have and w is not None:
                with np.errstate(invalid="ignore", divide="ignore"):
                    entry[f"{key}_ci95"] = ci95((w @ ok) / (w @ rows))
            else:
                entry[f"{key}_ci95"] = None
        out[name] = entry
    return out


def markdown(entry: dict) -> str:
    """The report section: each class's threshold and the sensitivity / specificity its
    flags reach on every split of `entry` ({"target", "chosen_on", split: rates})."""
    splits = [s for s in ("val", "test", "evaluated") if s in entry]
    header = ["class", "threshold"] + [f"{s} {m}" for s in splits
                                       for m in ("sensitivity", "specificity")]
    rows = []
    for name, first in entry[splits[0]].items():
        t = first["threshold"]
        row = [name, "none" if t is None else f"{t:.4f}"]
        for s in splits:
            r = entry[s][name]
            row += [fmt_ci(r[m], r[f"{m}_ci95"]) for m in ("sensitivity", "specificity")]
        rows.append(row)
    lines = [f"Target `{entry['target']}`, thresholds chosen on the {entry['chosen_on']} split: "
             f"an image is flagged for a class when that class's probability reaches its "
             f"threshold (95% CIs resample patients; `none`: the split lacked positives or "
             f"negatives of that class). The class decision itself is the combiner's rule.", ""]
    return "\n".join(lines + markdown_table(header, rows))
