"""Paired significance tests for two predictors scored on the same test examples.

McNemar's test compares error rates through the discordant pairs; the paired bootstrap compares
any metric of `ensembles.evaluate.metrics.bootstrap_metrics` (accuracy, macro F1, macro ROC-AUC)
by resampling examples, or whole patients when patient ids are known, with the same draws for
both predictors so their correlation is kept. Across seeds, `sign_flip_test` is an exact paired
permutation test of per-seed differences; `holm` adjusts a family of p-values.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
from scipy.stats import binomtest, chi2

from ensembles.evaluate.metrics import (
    bootstrap_metrics,
    bootstrap_weights,
    check_decisions,
    check_predictions,
    resampling_units,
)

EXACT_BELOW = 25   # discordant pairs under which the exact binomial test is used
METRICS = ("accuracy", "macro_f1", "roc_auc_macro")


def mcnemar_from_counts(b: int, c: int, *, exact: bool | None = None) -> dict:
    """McNemar's test from discordant counts b (only A right) and c (only B right).

    exact=None picks the exact two-sided binomial test when b + c < 25, otherwise the chi-square
    statistic with continuity correction max(|b - c| - 1, 0)^2 / (b + c) on 1 degree of freedom
    (the max keeps b == c at p = 1).
    """
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    n = b + c
    if exact is None:
        exact = n < EXACT_BELOW
    if n == 0:
        return {"b": 0, "c": 0, "statistic": 0.0, "p_value": 1.0,
                "method": "exact binomial" if exact else "chi-square (continuity corrected)"}
    if exact:
        return {"b": int(b), "c": int(c), "statistic": float(min(b, c)),
                "p_value": float(binomtest(min(b, c), n, 0.5).pvalue), "method": "exact binomial"}
    stat = max(abs(b - c) - 1, 0) ** 2 / n
    return {"b": int(b), "c": int(c), "statistic": float(stat), "p_value": float(chi2.sf(stat, 1)),
            "method": "chi-square (continuity corrected)"}


def mcnemar(y_true, pred_a, pred_b, *, exact: bool | None = None) -> dict:
    """McNemar's test of equal error rates for predicted labels of A and B on the same examples."""
    y, a, b = (np.asarray(v) for v in (y_true, pred_a, pred_b))
    if not (y.shape == a.shape == b.shape and y.ndim == 1):
        raise ValueError(f"need three label vectors of equal length; "
                         f"got {y.shape}, {a.shape}, {b.shape}")
    right_a, right_b = a == y, b == y
    out = mcnemar_from_counts(int(np.sum(right_a & ~right_b)), int(np.sum(~right_a & right_b)),
                              exact=exact)
    out["accuracy_a"], out["accuracy_b"] = float(right_a.mean()), float(right_b.mean())
    return out


def paired_bootstrap(y_true, proba_a, proba_b, *, metric: str = "macro_f1", patient_ids=None,
                     n_bootstrap: int = 2000, seed: int = 0, pred_a=None, pred_b=None) -> dict:
    """Difference metric(A) - metric(B) with a 95% percentile CI and a two-sided p-value.

    Label metrics use `pred_a` / `pred_b` when given (decisions that are not argmax(proba)).

    Both predictors are scored on the same resamples (patients when ids are known). The p-value
    is the shift method: the share of resampled differences, centred on the observed one, at
    least as far from 0 as the observed difference, (1 + count) / (1 + n_bootstrap).
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    if n_bootstrap < 1:
        raise ValueError(f"n_bootstrap must be >= 1, got {n_bootstrap}")
    pa, pb = np.asarray(proba_a), np.asarray(proba_b)
    if pa.shape != pb.shape:
        raise ValueError(f"proba_a {pa.shape} and proba_b {pb.shape} differ in shape")
    names = [str(k) for k in range(pa.shape[-1])] if pa.ndim == 2 else []
    y, pa, ids = check_predictions(y_true, pa, names, patient_ids)
    _, pb, _ = check_predictions(y, pb, names)
    da = None if pred_a is None else check_decisions(pred_a, len(y), pa.shape[1])
    db = None if pred_b is None else check_decisions(pred_b, len(y), pa.shape[1])

    def scores(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return (bootstrap_metrics(y, pa, w, da)[metric], bootstrap_metrics(y, pb, w, db)[metric])

    a, b = (v[0] for v in scores(np.ones((1, len(y)))))
    units, unit_kind = resampling_units(ids, len(y))
    diffs = np.concatenate([np.subtract(*scores(w))
                            for w in bootstrap_weights(units, n_bootstrap, seed)])
    diffs = diffs[~np.isnan(diffs)]
    if len(diffs) == 0:
        raise ValueError(f"{metric} is undefined on every resample (too few examples per class)")
    d = float(a - b)
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    p = (1 + np.sum(np.abs(diffs - d) >= abs(d))) / (1 + len(diffs))
    return {"metric": metric, "a": float(a), "b": float(b), "difference": d,
            "ci95": [float(lo), float(hi)], "p_value": float(p), "n_resamples": int(len(diffs)),
            "unit": unit_kind}


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order (NaN stays NaN, out of the
    family): sorted ascending, p_(i) * (m - i + 1), made monotone by a running max, capped at 1.
    """
    p = np.asarray(p_values, dtype=np.float64)
    if p.ndim != 1 or np.any((p < 0) | (p > 1)):
        raise ValueError(f"p-values must be a 1-D list in [0, 1], got {p_values!r}")
    adjusted = np.full(len(p), np.nan)
    kept = np.flatnonzero(~np.isnan(p))
    order = kept[np.argsort(p[kept], kind="stable")]
    m = len(order)
    steps = np.maximum.accumulate(p[order] * (m - np.arange(m)))
    adjusted[order] = np.minimum(steps, 1.0)
    return adjusted.tolist()


def sign_flip_test(differences: Sequence[float]) -> dict:
    """Exact two-sided paired permutation test of mean(differences) = 0 (e.g. one macro-F1
    difference per seed): every one of the 2^n sign flips is equally likely under the null;
    p = share of flips whose |mean| is at least the observed one. With n seeds the smallest
    possible p is 2 / 2^n (0.25 for 3 seeds): few seeds cannot show significance."""
    d = np.asarray(differences, dtype=np.float64)
    if d.ndim != 1 or len(d) == 0 or not np.all(np.isfinite(d)) or len(d) > 20:
        raise ValueError(f"need 1 to 20 finite differences, got {differences!r}")
    signs = np.array(list(itertools.product((1.0, -1.0), repeat=len(d))))
    flipped = np.abs(signs @ d) / len(d)
    observed = abs(d.mean())
    p = float(np.mean(flipped >= observed - 1e-12))
    return {"n": len(d), "mean_difference": float(d.mean()), "p_value": p,
            "min_p": 2 / 2 ** len(d)}
