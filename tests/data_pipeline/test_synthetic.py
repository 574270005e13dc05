"""Tests for data_pipeline.synthetic: contract, determinism, balance, stability under a
growing count, lung masks, findings confined to the lungs, and a separability check."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from data_pipeline import classes, synthetic
from data_pipeline.synthetic import generate_phantoms


def test_contract_shapes_dtypes_ids():
    d = generate_phantoms(6, image_size=24, seed=3)
    assert d["image"].shape == d["mask"].shape == (6, 24, 24, 1)
    assert d["image"].dtype == d["mask"].dtype == np.uint8
    assert d["label"].dtype == np.int64 and d["label"].shape == (6,)
    assert set(np.unique(d["mask"])) <= {0, 255}
    assert d["class_names"] == classes.DEFAULT_CLASSES
    assert list(d["patient_id"]) == [f"synthetic-{i:06d}" for i in range(6)]
    assert d["image"].std() > 20  # not blank


def test_deterministic_and_seeded():
    a = generate_phantoms(5, image_size=16, seed=7)
    b = generate_phantoms(5, image_size=16, seed=7)
    c = generate_phantoms(5, image_size=16, seed=8)
    for key in ("image", "mask", "label"):
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["image"], c["image"])


@pytest.mark.parametrize("count", [0, 1, 3, 4, 10, 13])
def test_classes_balanced(count):
    d = generate_phantoms(count, image_size=8)
    per_class = np.bincount(d["label"], minlength=4)
    assert per_class.sum() == count and per_class.max() - per_class.min() <= 1


def test_order_shuffled_and_subset_of_classes():
    d = generate_phantoms(40, image_size=8, seed=0)
    assert not np.array_equal(d["label"], np.arange(40) % 4)
    sub = generate_phantoms(9, image_size=8, classes=["NORMAL", "Bacterial Pneumonia"])
    assert sub["class_names"] == (classes.NORMAL, classes.BACTERIAL_PNEUMONIA)
    assert sorted(np.bincount(sub["label"]).tolist()) == [4, 5]


def test_example_does_not_depend_on_count():
    # 70 crosses the 64-example rendering chunk; earlier examples must stay identical.
    small, large = generate_phantoms(66, image_size=16), generate_phantoms(70, image_size=16)
    for key in ("image", "mask", "label", "patient_id"):
        np.testing.assert_array_equal(small[key], large[key][:66])


def test_masks_cover_two_dark_lungs():
    d = generate_phantoms(12, image_size=64, seed=2)
    for image, mask in zip(d["image"][..., 0], d["mask"][..., 0] > 0, strict=True):
        assert 0.15 < mask.mean() < 0.5
        labelled, n = ndimage.label(mask)
        assert n == 2
        centres = [np.argwhere(labelled == k)[:, 1].mean() for k in (1, 2)]
        assert min(centres) < 32 < max(centres)  # one lung on each side
        # lungs are darker than the body around them (mediastinum, bones, abdomen)
        body = (image > 30) & ~ndimage.binary_dilation(mask, iterations=2)
        assert image[mask].mean() < image[body].mean() - 20


@pytest.mark.parametrize("label", [classes.COVID, classes.VIRAL_PNEUMONIA,
                                   classes.BACTERIAL_PNEUMONIA])
def test_findings_stay_inside_lung_mask(label):
    size = 48
    draws = [synthetic._draw(np.random.default_rng([0, 0, i]), label, size) for i in range(4)]
    sick = synthetic._stack(draws)
    healthy = dict(sick)
    for name in ("sev_reticular", "sev_ggo", "sev_consolidation"):
        healthy[name] = np.zeros_like(sick[name])
    atten_sick, lung = synthetic._attenuation(sick, size)
    atten_healthy, lung_healthy = synthetic._attenuation(healthy, size)
    np.testing.assert_array_equal(lung, lung_healthy)
    diff = atten_sick - atten_healthy
    assert np.all(diff[lung == 0] == 0)
    assert np.all(diff.reshape(4, -1).max(1) > 0.05)  # every sick example has a finding


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown class name"):
        generate_phantoms(4, classes=["covid", "tuberculosis"])
    with pytest.raises(ValueError, match="lung_opacity"):
        generate_phantoms(4, classes=["lung_opacity"])
    with pytest.raises(ValueError, match="count and seed"):
        generate_phantoms(-1)
    with pytest.raises(ValueError, match="image_size"):
        generate_phantoms(4, image_size=4)


@pytest.mark.slow
def test_learnable_but_not_trivially_separable():
    """A linear model on 32x32 pixels and gradient magnitudes beats chance, is not perfect."""
    d = generate_phantoms(600, image_size=32, seed=11)
    x = d["image"][..., 0].astype(np.float32) / 255
    gy, gx = np.gradient(x, axis=(1, 2))
    features = np.concatenate([x.reshape(600, -1), np.hypot(gx, gy).reshape(600, -1)], axis=1)
    y = d["label"]
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.01, max_iter=3000))
    model.fit(features[:400], y[:400])
    score = f1_score(y[400:], model.predict(features[400:]), average="macro")
    assert 0.5 <= score < 0.98, score
