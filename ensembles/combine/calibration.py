"""Calibration: reliability bins, expected calibration error and temperature scaling.

Temperature scaling (Guo et al., 2017) divides logits by one scalar T fitted on validation
logits by minimising the negative log-likelihood; it changes confidence, never the argmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax

DEFAULT_BINS = 15


def _check_labels_proba(y_true, scores, what: str) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or y.ndim != 1 or len(y) != len(s):
        raise ValueError(f"{what} must be [N, K] with labels [N]; got {s.shape} and {y.shape}")
    if len(y) == 0:
        raise ValueError(f"{what}: no examples")
    if not np.all(np.isfinite(s)):
        raise ValueError(f"{what} contains NaN or inf")
    if y.min() < 0 or y.max() >= s.shape[1]:
        raise ValueError(f"labels must lie in [0, {s.shape[1]}); got range [{y.min()}, {y.max()}]")
    return y.astype(np.int64), s


def reliability_bins(y_true, proba, n_bins: int = DEFAULT_BINS) -> dict[str, np.ndarray]:
    """Bin examples by confidence (max probability) into `n_bins` equal-width bins on (0, 1].

    Returns edges [n_bins+1] and per bin: count, mean confidence, accuracy (NaN when empty).
    Bin b holds confidences in (edges[b], edges[b+1]]; a confidence of exactly 0 goes to bin 0.
    """
    y, p = _check_labels_proba(y_true, proba, "proba")
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    b = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(b, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(b, weights=conf, minlength=n_bins) / count
        acc = np.bincount(b, weights=correct, minlength=n_bins) / count
    return {"edges": edges, "count": count, "confidence": mean_conf, "accuracy": acc}


def expected_calibration_error(y_true, proba, n_bins: int = DEFAULT_BINS) -> float:
    """ECE = sum_b |B_b|/N * |accuracy(B_b) - confidence(B_b)| over equal-width confidence bins."""
    bins = reliability_bins(y_true, proba, n_bins)
    filled = bins["count"] > 0
    gap = np.abs(bins["accuracy"][filled] - bins["confidence"][filled])
    return float(np.sum(bins["count"][filled] * gap) / np.sum(bins["count"]))


def negative_log_likelihood(y_true, logits, temperature: float = 1.0) -> float:
    """Mean cross-entropy of softmax(logits / temperature) against integer labels."""
    y, z = _check_labels_proba(y_true, logits, "logits")
    return float(-np.mean(log_softmax(z / temperature, axis=1)[np.arange(len(y)), y]))


def fit_temperature(logits, y_true, *, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """The temperature T in `bounds` minimising validation NLL (bounded 1-D search on log T)."""
    y, z = _check_labels_proba(y_true, logits, "logits")
    lo, hi = np.log(bounds[0]), np.log(bounds[1])
    res = minimize_scalar(lambda log_t: negative_log_likelihood(y, z, float(np.exp(log_t))),
                          bounds=(lo, hi), method="bounded", options={"xatol": 1e-6})
    return float(np.exp(res.x))


def apply_temperature(logits, temperature: float) -> np.ndarray:
    """Class probabilities softmax(logits / T)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1)


@dataclass(frozen=True)
class CalibrationReport:
    """Temperature and the NLL / ECE of the same logits before (T=1) and after scaling."""

    temperature: float
    nll_before: float
    nll_after: float
    ece_before: float
    ece_after: float

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.__dict__.items()}


class TemperatureScaling:
    """Scikit-learn style scaler: `fit` on validation logits, `predict_proba` on test logits."""

    def __init__(self, bounds: tuple[float, float] = (0.05, 20.0), n_bins: int = DEFAULT_BINS):
        self.bounds = bounds
        self.n_bins = n_bins

    def fit(self, logits, y_true) -> TemperatureScaling:
        self.temperature_ = fit_temperature(logits, y_true, bounds=self.bounds)
        return self

    def predict_proba(self, logits) -> np.ndarray:
        return apply_temperature(logits, self.temperature_)

    def predict(self, logits) -> np.ndarray:
        return np.asarray(logits).argmax(axis=1)

    def report(self, logits, y_true) -> CalibrationReport:
        """NLL and ECE of `logits` (e.g. the test set) before and after the fitted temperature."""
        t = self.temperature_
        return CalibrationReport(
            temperature=t,
            nll_before=negative_log_likelihood(y_true, logits),
            nll_after=negative_log_likelihood(y_true, logits, t),
            ece_before=expected_calibration_error(
                y_true, apply_temperature(logits, 1.0), self.n_bins),
            ece_after=expected_calibration_error(y_true, self.predict_proba(logits), self.n_bins))
