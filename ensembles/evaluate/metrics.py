"""Metrics shared by every experiment: point estimates with bootstrap CIs.

`evaluate_predictions` turns labels and class probabilities into a JSON-ready dict (point
estimates from sklearn.metrics; 95% percentile-bootstrap CIs that resample patients when patient
ids are known, so correlated images of one patient do not narrow the interval);
`ensembles.report.write` turns them into a run's report.

Macro averages and the macro ROC-AUC run over the classes present in `y_true`; an absent class
gets ROC-AUC None and a warning instead of an exception (cross-dataset evaluation needs this).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np
from sklearn import metrics as skm

from ensembles.combine.calibration import DEFAULT_BINS, expected_calibration_error

_PROBA_SUM_TOL = 1e-3


def check_predictions(y_true, proba, class_names: Sequence[str], patient_ids=None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Validated (labels int64 [N], proba float64 [N, K], patient ids str [N] or None)."""
    y = np.asarray(y_true)
    p = np.asarray(proba, dtype=np.float64)
    k = len(class_names)
    if y.ndim != 1 or p.ndim != 2 or len(y) != len(p):
        raise ValueError(f"need y_true [N] and proba [N, K]; got {y.shape} and {p.shape}")
    if len(y) == 0:
        raise ValueError("no examples to evaluate")
    if p.shape[1] != k:
        raise ValueError(f"proba has {p.shape[1]} columns but {k} class names: {list(class_names)}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"y_true must hold integer labels, got dtype {y.dtype}")
    if y.min() < 0 or y.max() >= k:
        raise ValueError(f"labels must lie in [0, {k}); got range [{y.min()}, {y.max()}]")
    if not np.all(np.isfinite(p)) or p.min() < 0 or p.max() > 1:
        raise ValueError("proba must be finite and within [0, 1]")
    worst = float(np.max(np.abs(p.sum(axis=1) - 1.0)))
    if worst > _PROBA_SUM_TOL:
        raise ValueError(f"proba rows must sum to 1 (worst row is off by {worst:.3g})")
    ids = None
    if patient_ids is not None:
        ids = np.asarray(patient_ids).astype(str)
        if ids.shape != y.shape:
            raise ValueError(f"patient_ids has shape {ids.shape}, expected {y.shape}")
    return y.astype(np.int64), p, ids


def check_decisions(y_pred, n: int, k: int) -> np.ndarray:
    """Validated predicted labels int64 [n] in [0, k)."""
    pred = np.asarray(y_pred)
    if pred.shape != (n,) or not np.issubdtype(pred.dtype, np.integer):
        raise ValueError(f"y_pred must be {n} integer labels, got {pred.dtype} {pred.shape}")
    if pred.min() < 0 or pred.max() >= k:
        raise ValueError(f"y_pred must lie in [0, {k}); got range [{pred.min()}, {pred.max()}]")
    return pred.astype(np.int64)


def resampling_units(patient_ids: np.ndarray | None, n: int) -> tuple[np.ndarray, str]:
    """Unit index per example for the bootstrap: one unit per patient when any id is known
    (examples with an unknown id, '', are their own unit), else one unit per example."""
    if patient_ids is None or not np.any(patient_ids != ""):
        return np.arange(n), "example"
    known = patient_ids != ""
    patients = np.unique(patient_ids[known], return_inverse=True)[1].ravel()
    units = np.empty(n, dtype=np.int64)
    units[known] = patients
    units[~known] = patients.max() + 1 + np.arange(np.sum(~known))
    return units, "patient"


def bootstrap_weights(units: np.ndarray, n_bootstrap: int, seed: int,
                      chunk: int = 128) -> Iterator[np.ndarray]:
    """Multiplicity of each example in `n_bootstrap` resamples of units drawn with replacement.

    Yields float [<=chunk, N] blocks (memory stays chunk * N): resampling a unit brings all of
    its examples along.
    """
    n_units = int(units.max()) + 1
    rng = np.random.default_rng(seed)
    for start in range(0, n_bootstrap, chunk):
        b = min(chunk, n_bootstrap - start)
        draws = rng.integers(0, n_units, size=(b, n_units))
        offsets = (np.arange(b) * n_units)[:, None]
        counts = np.bincount((draws + offsets).ravel(), minlength=b * n_units)
        yield counts.reshape(b, n_units)[:, units].astype(np.float64)


def weighted_confusion(y: np.ndarray, pred: np.ndarray, k: int, w: np.ndarray) -> np.ndarray:
    """Confusion matrices [B, K, K] (rows = true) of example weights w [B, N]."""
    cell = np.eye(k * k)[y * k + pred]                     # [N, K*K]
    return (w @ cell).reshape(len(w), k, k)


def weighted_ovr_auc(y: np.ndarray, scores: np.ndarray, positive: int, w: np.ndarray) -> np.ndarray:
    """One-vs-rest ROC-AUC of `scores` for class `positive` under each weight row of w [B, N].

    Exact Mann-Whitney form with ties counted half, so unit weights give sklearn's roc_auc_score;
    NaN where a resample has no positive or no negative example.
    """
    order = np.argsort(scores, kind="mergesort")
    s = scores[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])   # first index of each tied group
    is_pos = (y[order] == positive)
    wp = np.add.reduceat(w[:, order] * is_pos, starts, axis=1)
    wn = np.add.reduceat(w[:, order] * ~is_pos, starts, axis=1)
    below = np.cumsum(wn, axis=1) - wn
    num = np.sum(wp * (below + 0.5 * wn), axis=1)
    den = wp.sum(axis=1) * wn.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def bootstrap_metrics(y: np.ndarray, proba: np.ndarray, w: np.ndarray,
                      pred: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Accuracy, macro F1, macro OvR ROC-AUC and per-class recall for each weight row.

    Label metrics use `pred` (default: argmax of proba); ROC-AUC uses proba.
    """
    k = proba.shape[1]
    pred = proba.argmax(axis=1) if pred is None else pred
    cm = weighted_confusion(y, pred, k, w)
    tp = np.diagonal(cm, axis1=1, axis2=2)
    support, predicted = cm.sum(axis=2), cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, tp / support, np.nan)
        f1 = np.where(support > 0, np.where(tp > 0, 2 * tp / (support + predicted), 0.0), np.nan)
    auc = np.stack([weighted_ovr_auc(y, proba[:, c], c, w) for c in range(k)], axis=1)
    with np.errstate(invalid="ignore"):
        return {"accuracy": tp.sum(axis=1) / w.sum(axis=1),
                "macro_f1": _nanmean_rows(f1),
                "roc_auc_macro": _nanmean_rows(auc),
                "recall": recall}


def _nanmean_rows(x: np.ndarray) -> np.ndarray:
    n = np.sum(~np.isnan(x), axis=1)
    return np.where(n > 0, np.nansum(x, axis=1) / np.maximum(n, 1), np.nan)


def ci95(values: np.ndarray) -> list[float] | None:
    v = values[~np.isnan(values)]
    if len(v) == 0:
        return None
    lo, hi = np.percentile(v, [2.5, 97.5])
    return [float(lo), float(hi)]


def _mean_or_none(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def evaluate_predictions(y_true, proba, class_names: Sequence[str], *, patient_ids=None,
                         n_bootstrap: int = 1000, seed: int = 0, y_pred=None) -> dict:
    """Classification metrics of `proba` [N, K] against integer labels, JSON-ready.

    Label metrics (accuracy, precision, recall, F1, confusion) use `y_pred` when given (a
    combiner whose decision is not argmax(proba): the thresholded cascade, OvO votes), else
    argmax(proba); ROC-AUC and ECE always use proba.

    Keys: accuracy, per_class {name: precision, recall, specificity, f1, support, roc_auc},
    macro_/weighted_ precision, recall, specificity, f1, confusion_matrix (rows = true),
    roc_auc_macro, ece, ci95 (None when n_bootstrap == 0), bootstrap, class_names,
    n_examples, n_patients, absent_classes, warnings.
    """
    y, p, ids = check_predictions(y_true, proba, class_names, patient_ids)
    names = [str(c) for c in class_names]
    k, n = len(names), len(y)
    labels = np.arange(k)
    pred = p.argmax(axis=1) if y_pred is None else check_decisions(y_pred, n, k)
    cm = skm.confusion_matrix(y, pred, labels=labels)
    prec, rec, f1, support = skm.precision_recall_fscore_support(
        y, pred, labels=labels, zero_division=0)
    present = support > 0
    absent = [names[c] for c in labels if not present[c]]
    warnings = [f"class {c!r} is absent from y_true: its recall, specificity and ROC-AUC are "
                f"undefined and left out of the macro averages" for c in absent]

    per_class = {}
    for c in labels:
        negatives = n - support[c]
        fp = cm[:, c].sum() - cm[c, c]
        auc = (float(skm.roc_auc_score(y == c, p[:, c]))
               if present[c] and negatives > 0 else None)
        if present[c] and negatives == 0:
            warnings.append(f"every example is {names[c]!r}: its specificity and ROC-AUC are "
                            f"undefined")
        per_class[names[c]] = {
            "precision": float(prec[c]),
            "recall": float(rec[c]) if present[c] else None,
            "specificity": float((negatives - fp) / negatives) if negatives > 0 else None,
            "f1": float(f1[c]),
            "support": int(support[c]),
            "roc_auc": auc,
        }

    out: dict = {"class_names": names, "n_examples": int(n),
                 "n_patients": int(len(set(ids[ids != ""]))) if ids is not None else 0,
                 "accuracy": float(skm.accuracy_score(y, pred))}
    weights = support[present] / support[present].sum()
    for metric in ("precision", "recall", "specificity", "f1"):
        vals = [per_class[names[c]][metric] for c in labels if present[c]]
        out[f"macro_{metric}"] = _mean_or_none(vals)
        defined = [(v, w) for v, w in zip(vals, weights, strict=True) if v is not None]
        out[f"weighted_{metric}"] = (
            float(sum(v * w for v, w in defined) / sum(w for _, w in defined)) if defined else None)
    out["per_class"] = per_class
    out["confusion_matrix"] = cm.astype(int).tolist()
    out["roc_auc_macro"] = _mean_or_none([per_class[c]["roc_auc"] for c in names])
    out["ece"] = expected_calibration_error(y, p, DEFAULT_BINS)
    out["absent_classes"] = absent
    out["warnings"] = warnings

    units, unit_kind = resampling_units(ids, n)
    out["bootstrap"] = {"n_resamples": int(n_bootstrap), "unit": unit_kind,
                        "n_units": int(units.max()) + 1, "seed": int(seed), "method": "percentile"}
    if n_bootstrap <= 0:
        out["ci95"] = None
        return out
    blocks = [bootstrap_metrics(y, p, w, pred) for w in bootstrap_weights(units, n_bootstrap, seed)]
    boot = {key: np.concatenate([b[key] for b in blocks]) for key in blocks[0]}
    out["ci95"] = {
        "accuracy": ci95(boot["accuracy"]),
        "macro_f1": ci95(boot["macro_f1"]),
        "roc_auc_macro": ci95(boot["roc_auc_macro"]) if out["roc_auc_macro"] is not None else None,
        "recall": {names[c]: (ci95(boot["recall"][:, c]) if present[c] else None) for c in labels},
    }
    return out


def classes_present(metrics: Mapping) -> int:
    """How many classes have support > 0 in the evaluated labels (per_class[c]["support"]).

    A model's classes that the data lacks do not count: chance is judged on what was tested.
    """
    k = sum(1 for m in metrics["per_class"].values() if m["support"] > 0)
    if k == 0:
        raise ValueError("no class has support > 0 in these metrics")
    return k


def chance_level(num_classes: int) -> float:
    """Accuracy and macro-F1 of guessing uniformly among `num_classes` balanced classes.

    Pass the classes present in the evaluated labels (`classes_present(metrics)`), not the
    model's class count: macro averages run over the classes present.
    """
    if num_classes < 1:
        raise ValueError(f"chance needs at least one class, got {num_classes}")
    return 1.0 / num_classes


def includes_chance(metrics: Mapping) -> bool:
    """Whether the macro-F1 95% CI (or, without one, the point value) reaches chance, i.e.
    1 / the number of classes present in the evaluated labels."""
    chance = chance_level(classes_present(metrics))
    ci = (metrics.get("ci95") or {}).get("macro_f1")
    return (ci[0] if ci else metrics["macro_f1"]) <= chance
