"""Balancing: equal class counts after resampling, determinism, sklearn-style class weights."""

from __future__ import annotations

import numpy as np
import pytest

from data_pipeline.balance import balance_indices, class_weights

LABELS = np.repeat(np.arange(3), [50, 10, 25])  # full per-example labels
INDICES = np.arange(0, 85, 1)[::-1]             # a "split" given in any order


def test_downsample_to_smallest_class_without_repeats():
    out = balance_indices(INDICES, LABELS, mode="downsample", seed=0)
    assert np.array_equal(np.bincount(LABELS[out]), [10, 10, 10])
    assert len(np.unique(out)) == len(out)
    assert np.isin(out, INDICES).all()


def test_oversample_keeps_every_example_and_reaches_largest():
    out = balance_indices(INDICES, LABELS, mode="oversample", seed=0)
    assert np.array_equal(np.bincount(LABELS[out]), [50, 50, 50])
    assert np.isin(INDICES, out).all()          # nothing dropped
    assert len(np.unique(out)) == len(INDICES)  # only repeats were added


def test_balance_only_looks_at_the_given_indices():
    subset = np.array([0, 1, 2, 50, 51])  # classes 0, 0, 0, 1, 1
    out = balance_indices(subset, LABELS, mode="oversample")
    assert np.array_equal(np.bincount(LABELS[out], minlength=3), [3, 3, 0])


def test_balance_is_deterministic_and_seeded():
    a = balance_indices(INDICES, LABELS, mode="downsample", seed=1)
    b = balance_indices(INDICES, LABELS, mode="downsample", seed=1)
    c = balance_indices(INDICES, LABELS, mode="downsample", seed=2)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_none_returns_indices_unchanged():
    assert np.array_equal(balance_indices(INDICES, LABELS, mode="none"), INDICES)


def test_balance_errors():
    with pytest.raises(ValueError, match="unknown balance mode"):
        balance_indices(INDICES, LABELS, mode="smote")
    with pytest.raises(ValueError, match=r"must lie in \[0, 85\)"):
        balance_indices([0, 85], LABELS, mode="downsample")


def test_class_weights_balanced_rule():
    w = class_weights(LABELS, 3)
    assert w.dtype == np.float32
    np.testing.assert_allclose(w, [85 / (3 * 50), 85 / (3 * 10), 85 / (3 * 25)], rtol=1e-6)
    # weighted counts are equal per class: the point of the rule
    np.testing.assert_allclose(w * np.bincount(LABELS), 85 / 3, rtol=1e-6)


def test_class_weights_errors():
    with pytest.raises(ValueError, match=r"class\(es\) 3 have no examples"):
        class_weights(LABELS, 4)
    with pytest.raises(ValueError, match=r"must lie in \[0, 2\)"):
        class_weights(LABELS, 2)
