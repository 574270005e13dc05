"""ensembles.meta (stacking meta-classifier, leakage guard, JSON / skops save and load) and
ensembles.calibration (temperature scaling)."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
import skops.io as sio
from sklearn.datasets import make_classification
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import KFold, cross_val_predict
from sklearn.neighbors import KNeighborsClassifier
from threadpoolctl import threadpool_limits

from ensembles.combine.calibration import (
    TemperatureScaling,
    apply_temperature,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
)
from ensembles.combine.meta import (
    GBOOST_FORMAT,
    MetaClassifier,
    check_no_leakage,
    make_features,
)


def _member_outputs(seed=0, n=300):
    """A 3-class problem, an overfitting member (1-NN), its OOF and in-sample predictions."""
    x, y = make_classification(n_samples=n, n_features=6, n_informative=4, n_classes=3,
                               n_clusters_per_class=1, class_sep=1.0, random_state=seed)
    member = KNeighborsClassifier(n_neighbors=1)
    folds = list(KFold(3, shuffle=True, random_state=seed).split(x))
    oof = cross_val_predict(member, x, y, cv=folds, method="predict_proba")
    in_sample = member.fit(x, y).predict_proba(x)
    return x, y, folds, oof, in_sample


def test_make_features_layout():
    a = np.zeros((5, 3))
    ova = [np.full((5, 2), 0.5)] * 3
    x, layout = make_features({"single/logits": a, "ova/resnet": ova, "ovo": np.ones((5, 3, 2))})
    assert x.shape == (5, 3 + 6 + 6)
    assert layout[0] == {"block": "single/logits", "member": 0, "columns": 3}
    assert [b["member"] for b in layout[1:4]] == [0, 1, 2] and len(layout) == 7
    with pytest.raises(ValueError, match="rows"):
        make_features({"a": a, "b": np.zeros((4, 2))})


def test_fit_refuses_member_training_predictions():
    _, y, folds, oof, in_sample = _member_outputs()
    everything = np.arange(len(y))
    # In-sample predictions of a 1-NN member are perfect: exactly what stacking must not see.
    assert (in_sample.argmax(1) == y).all()
    with pytest.raises(ValueError, match=r"leakage: 300 of 300"):
        MetaClassifier().fit(in_sample, y, example_indices=everything, train_indices=everything)
    half = everything[:150]
    with pytest.raises(ValueError, match=r"leakage: 150 of 300"):
        MetaClassifier().fit(in_sample, y, example_indices=everything, train_indices=half)
    # Out-of-fold: row i predicted by the fold model that did not train on it -> accepted ...
    fold = np.zeros(len(y), dtype=int)
    for f, (_, val) in enumerate(folds):
        fold[val] = f
    trains = [tr for tr, _ in folds]
    meta = MetaClassifier().fit(oof, y, example_indices=everything, train_indices=trains, fold=fold)
    assert meta.predict(oof).shape == y.shape
    # ... but the same rows attributed to the wrong folds are leakage.
    with pytest.raises(ValueError, match="leakage"):
        check_no_leakage(everything, trains, (fold + 1) % 3)


def test_validation_predictions_and_class_checks():
    x, y, _, _, _ = _member_outputs(seed=1)
    train, val = np.arange(200), np.arange(200, 300)
    member = KNeighborsClassifier(n_neighbors=5).fit(x[train], y[train])
    feats, layout = make_features({"knn": member.predict_proba(x[val])})
    meta = MetaClassifier().fit(feats, y[val], example_indices=val, train_indices=train,
                                layout=layout)
    assert (meta.predict(feats) == y[val]).mean() > 0.7
    with pytest.raises(ValueError, match=r"lack class\(es\) \[2\]"):
        keep = y[val] != 2
        MetaClassifier().fit(feats[keep], y[val][keep], example_indices=val[keep],
                             train_indices=train, n_classes=3)
    with pytest.raises(ValueError, match="unknown meta model"):
        MetaClassifier(model="svm").fit(feats, y[val], example_indices=val, train_indices=train)


def test_json_round_trip_gives_identical_predictions(tmp_path):
    rng = np.random.default_rng(2)
    y = rng.integers(0, 4, 200)
    blocks = {"ova": [np.stack([1 - s, s], 1) for s in rng.random((4, 200)) * 0.5
                      + 0.5 * (y == np.arange(4)[:, None])],
              "single/logits": rng.normal(size=(200, 4)) + 2 * np.eye(4)[y]}
    x, layout = make_features(blocks)
    idx = np.arange(1000, 1200)
    meta = MetaClassifier(C=0.5).fit(x, y, example_indices=idx, train_indices=np.arange(1000),
                                     layout=layout)
    path = meta.save(tmp_path / "meta.json")
    assert b"\x80" not in path.read_bytes()[:2]                      # text, not a pickle
    loaded = MetaClassifier.load(path)
    np.testing.assert_array_equal(loaded.predict_proba(x), meta.predict_proba(x))
    np.testing.assert_array_equal(loaded.predict(x), meta.predict(x))
    assert loaded.get_params() == meta.get_params()
    np.testing.assert_array_equal(loaded.features(blocks), x)
    with pytest.raises(ValueError, match="layout differs"):
        loaded.features({"ova": blocks["ova"]})
    with pytest.raises(ValueError, match=r"expected features \[N, 12\]"):
        loaded.predict_proba(x[:, :4])


def _gboost_meta(seed=3, n=150):
    _, y, _, oof, _ = _member_outputs(seed=seed, n=n)
    _, layout = make_features({"knn": oof})
    with threadpool_limits(1):           # OpenMP threads on a shared 2-core CPU cost 20x here
        meta = MetaClassifier(model="gradient_boosting", max_iter=20).fit(
            oof, y, example_indices=np.arange(n), train_indices=np.array([], dtype=int),
            layout=layout)
    return meta, oof, y


def test_gradient_boosting_skops_round_trip_gives_identical_predictions(tmp_path):
    meta, oof, y = _gboost_meta()
    with threadpool_limits(1):
        np.testing.assert_allclose(meta.predict_proba(oof).sum(1), 1.0)
        assert (meta.predict(oof) == y).mean() > 0.8
        path = meta.save(tmp_path / meta.file_name)
        assert path.name == "meta.skops" and zipfile.is_zipfile(path)   # skops, not a pickle
        loaded = MetaClassifier.load(path)
        np.testing.assert_array_equal(loaded.predict_proba(oof), meta.predict_proba(oof))
    assert loaded.get_params() == meta.get_params()
    assert loaded.layout_ == meta.layout_ == [{"block": "knn", "member": 0, "columns": 3}]
    np.testing.assert_array_equal(loaded.features({"knn": oof}), oof)


def test_skops_file_with_other_types_is_refused(tmp_path):
    meta, oof, y = _gboost_meta()
    knn = KNeighborsClassifier(3, algorithm="kd_tree").fit(oof, y)
    doc = {"format": GBOOST_FORMAT, "params": meta.get_params(), "n_features": 3,
           "layout": meta.layout_, "estimator": knn}
    sio.dump(doc, tmp_path / "knn.skops")
    with pytest.raises(ValueError, match=r"outside the gradient-boosting .*allowlist: "
                                         r"sklearn\.metrics\..*EuclideanDistance64, "
                                         r"sklearn\.neighbors\._kd_tree\.KDTree"):
        MetaClassifier.load(tmp_path / "knn.skops")
    # a default-trusted estimator of the wrong kind passes skops' check but not ours
    sio.dump({**doc, "estimator": LogisticRegression().fit(oof, y)}, tmp_path / "lr.skops")
    with pytest.raises(ValueError, match="holds a LogisticRegression"):
        MetaClassifier.load(tmp_path / "lr.skops")
    (tmp_path / "junk.json").write_bytes(b"\x80\x04junk")
    with pytest.raises(ValueError, match="neither a JSON nor a skops"):
        MetaClassifier.load(tmp_path / "junk.json")


# --------------------------------------------------------------------------- calibration

def _overconfident_logits(seed, n=3000, k=4, scale=3.0):
    """Logits whose softmax at T=1 is calibrated, multiplied by `scale` (overconfident)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, k)) * 1.5
    p = apply_temperature(z, 1.0)
    y = np.minimum((np.cumsum(p, axis=1) < rng.random((n, 1))).sum(axis=1), k - 1)
    return z * scale, y


def test_temperature_scaling_recovers_the_scale_and_improves_nll_and_ece():
    val_z, val_y = _overconfident_logits(0)
    test_z, test_y = _overconfident_logits(1)
    scaler = TemperatureScaling().fit(val_z, val_y)
    assert scaler.temperature_ == pytest.approx(3.0, rel=0.1)
    rep = scaler.report(test_z, test_y)
    assert rep.nll_after < rep.nll_before and rep.ece_after < rep.ece_before
    assert rep.ece_after < 0.03 < rep.ece_before
    assert rep.as_dict()["temperature"] == scaler.temperature_
    np.testing.assert_array_equal(scaler.predict_proba(test_z).argmax(1), test_z.argmax(1))
    # the fitted T is the NLL minimiser: nudging it either way does worse on validation
    t = fit_temperature(val_z, val_y)
    best = negative_log_likelihood(val_y, val_z, t)
    assert best <= negative_log_likelihood(val_y, val_z, t * 1.05)
    assert best <= negative_log_likelihood(val_y, val_z, t / 1.05)


def test_ece_of_hand_made_bins():
    # two examples at confidence 0.9 (one right) and two at 0.6 (both right)
    p = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.4, 0.6]])
    y = np.array([0, 1, 0, 1])
    assert expected_calibration_error(y, p) == pytest.approx(0.5 * 0.4 + 0.5 * 0.4)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        apply_temperature(p, 0.0)
