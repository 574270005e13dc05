"""ensembles.evaluation (metrics, bootstrap CIs, report files) and ensembles.stats."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn import metrics as skm

from ensembles.evaluate.metrics import (
    evaluate_predictions,
    resampling_units,
    weighted_ovr_auc,
)
from ensembles.report.markdown import report_markdown
from ensembles.report.write import write_report

NAMES = ["covid", "normal", "viral_pneumonia", "bacterial_pneumonia"]


def _noisy_predictions(n: int, k: int = 4, signal: float = 1.5, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), y] += signal
    p = np.exp(logits)
    return y, p / p.sum(axis=1, keepdims=True)


def test_point_estimates_equal_sklearn():
    y, p = _noisy_predictions(300)
    m = evaluate_predictions(y, p, NAMES, n_bootstrap=0)
    pred = p.argmax(axis=1)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert m["weighted_f1"] == pytest.approx(skm.f1_score(y, pred, average="weighted"))
    assert m["macro_precision"] == pytest.approx(skm.precision_score(y, pred, average="macro"))
    assert m["weighted_recall"] == pytest.approx(skm.recall_score(y, pred, average="weighted"))
    assert m["confusion_matrix"] == skm.confusion_matrix(y, pred).tolist()
    assert m["roc_auc_macro"] == pytest.approx(
        skm.roc_auc_score(y, p, multi_class="ovr", average="macro"))
    recalls = skm.recall_score(y, pred, average=None)
    for c, name in enumerate(NAMES):
        assert m["per_class"][name]["recall"] == pytest.approx(recalls[c])
        assert m["per_class"][name]["roc_auc"] == pytest.approx(skm.roc_auc_score(y == c, p[:, c]))
    assert m["n_examples"] == 300 and m["ci95"] is None


def test_specificity_on_a_hand_counted_example():
    y = np.array([0, 0, 0, 1, 1, 2])
    pred = np.array([0, 1, 0, 1, 2, 2])
    p = np.eye(3)[pred] * 0.8 + 0.2 / 3
    m = evaluate_predictions(y, p, ["a", "b", "c"], n_bootstrap=0)
    # class a: negatives idx 3,4,5, none predicted a -> 3/3; class b: negatives 4, one FP
    # (idx 1) -> 3/4; class c: negatives 5, one FP (idx 4) -> 4/5.
    assert m["per_class"]["a"]["specificity"] == 1.0
    assert m["per_class"]["b"]["specificity"] == 0.75
    assert m["per_class"]["c"]["specificity"] == pytest.approx(0.8)
    assert m["per_class"]["a"]["precision"] == 1.0
    assert m["per_class"]["b"]["recall"] == 0.5
    assert m["macro_specificity"] == pytest.approx((1 + 0.75 + 0.8) / 3)


def test_weighted_auc_matches_sklearn_with_ties_and_weights():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 200)
    scores = np.round(rng.random(200) + 0.3 * (y == 1), 1)      # many ties
    w = rng.integers(0, 4, size=(5, 200)).astype(float)
    got = weighted_ovr_auc(y, scores, 1, np.vstack([np.ones(200), w]))
    assert got[0] == pytest.approx(skm.roc_auc_score(y == 1, scores))
    for row, g in zip(w, got[1:], strict=True):
        assert g == pytest.approx(skm.roc_auc_score(y == 1, scores, sample_weight=row))


def test_bootstrap_ci_contains_point_estimate_and_is_reproducible():
    y, p = _noisy_predictions(400, signal=1.0, seed=2)
    m = evaluate_predictions(y, p, NAMES, n_bootstrap=300, seed=3)
    ci = m["ci95"]
    for key in ("accuracy", "macro_f1", "roc_auc_macro"):
        lo, hi = ci[key]
        assert lo < m[key] < hi, key
        assert hi - lo < 0.2
    for name in NAMES:
        lo, hi = ci["recall"][name]
        assert lo <= m["per_class"][name]["recall"] <= hi
    assert evaluate_predictions(y, p, NAMES, n_bootstrap=300, seed=3)["ci95"] == ci
    assert m["bootstrap"]["unit"] == "example"


def test_patient_resampling_widens_the_ci_when_images_of_a_patient_agree():
    # 40 patients with 10 identical images each: the honest sample size is 40, not 400.
    y1, p1 = _noisy_predictions(40, signal=1.0, seed=4)
    y, p = np.repeat(y1, 10), np.repeat(p1, 10, axis=0)
    ids = np.repeat([f"p{i}" for i in range(40)], 10)
    by_example = evaluate_predictions(y, p, NAMES, n_bootstrap=400, seed=0)
    by_patient = evaluate_predictions(y, p, NAMES, patient_ids=ids, n_bootstrap=400, seed=0)
    assert by_patient["bootstrap"]["unit"] == "patient"
    assert by_patient["bootstrap"]["n_units"] == 40 and by_patient["n_patients"] == 40
    width = lambda m: m["ci95"]["accuracy"][1] - m["ci95"]["accuracy"][0]  # noqa: E731
    assert width(by_patient) > 2 * width(by_example)
    assert by_patient["accuracy"] == by_example["accuracy"]


def test_unknown_patient_ids_are_their_own_units():
    units, kind = resampling_units(np.array(["a", "", "a", "", "b"]), 5)
    assert kind == "patient"
    assert units[0] == units[2] and len(set(units.tolist())) == 4
    units, kind = resampling_units(np.array(["", "", ""]), 3)
    assert kind == "example" and units.tolist() == [0, 1, 2]


def test_absent_class_gets_none_and_a_warning():
    y, p = _noisy_predictions(200, seed=5)
    keep = y != 0
    m = evaluate_predictions(y[keep], p[keep], NAMES, n_bootstrap=50)
    assert m["per_class"]["covid"]["roc_auc"] is None
    assert m["per_class"]["covid"]["recall"] is None
    assert m["ci95"]["recall"]["covid"] is None
    assert m["absent_classes"] == ["covid"] and "covid" in m["warnings"][0]
    expected = np.mean([skm.roc_auc_score(y[keep] == c, p[keep][:, c]) for c in (1, 2, 3)])
    assert m["roc_auc_macro"] == pytest.approx(expected)


def test_ece_small_for_calibrated_and_large_for_overconfident_predictor():
    rng = np.random.default_rng(6)
    n = 20000
    p = rng.dirichlet(np.ones(4) * 0.5, size=n)
    y = np.minimum((np.cumsum(p, axis=1) < rng.random((n, 1))).sum(axis=1), 3)  # y ~ proba
    calibrated = evaluate_predictions(y, p, NAMES, n_bootstrap=0)["ece"]
    sharp = p ** 4 / np.sum(p ** 4, axis=1, keepdims=True)        # same argmax, overconfident
    overconfident = evaluate_predictions(y, sharp, NAMES, n_bootstrap=0)["ece"]
    assert calibrated < 0.015
    assert overconfident > 0.08


@pytest.mark.parametrize("y, p, match", [
    (np.array([0, 1]), np.array([[0.5, 0.5, 0.0]]), "need y_true"),
    (np.array([0, 4]), np.full((2, 4), 0.25), "labels must lie"),
    (np.array([0, 1]), np.full((2, 4), 0.3), "sum to 1"),
    (np.array([0, 1]), np.full((2, 3), 1 / 3), "3 columns but 4 class names"),
    (np.array([0.0, 1.0]), np.full((2, 4), 0.25), "integer labels"),
])
def test_bad_input_gets_a_clear_error(y, p, match):
    with pytest.raises(ValueError, match=match):
        evaluate_predictions(y, p, NAMES, n_bootstrap=0)


def test_write_report_files(tmp_path):
    y, p = _noisy_predictions(120, seed=7)
    m = evaluate_predictions(y, p, NAMES, patient_ids=(np.arange(120) // 2).astype(str),
                             n_bootstrap=100)
    paths = write_report(m, tmp_path / "run", y_true=y, proba=p, title="Test run",
                         extra_sections={"Notes": "seed 7"})
    for name in ("metrics.json", "report.md", "confusion.png", "roc.png", "reliability.png"):
        assert paths[name].is_file() and paths[name].stat().st_size > 0
        if name.endswith(".png"):
            assert paths[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    loaded = json.loads(paths["metrics.json"].read_text())
    assert loaded == m
    text = paths["report.md"].read_text()
    assert text.startswith("# Test run")
    assert f"| covid | {m['per_class']['covid']['precision']:.3f} |" in text
    assert "60 patients" in text and "## Notes" in text and "seed 7" in text
    row = "| normal | " + " | ".join(map(str, m["confusion_matrix"][1])) + " |"
    assert row in text


@pytest.mark.parametrize("signal, at_chance", [(0.0, True), (3.0, False)])
def test_report_says_at_the_top_whether_the_result_is_chance(signal, at_chance):
    """Pure noise gets the at-chance warning before any table; a learned model does not."""
    y, p = _noisy_predictions(200, signal=signal, seed=11)
    m = evaluate_predictions(y, p, NAMES, n_bootstrap=200)
    head = report_markdown(m, "Run").split("## Data")[0]
    f1, (lo, hi) = m["macro_f1"], m["ci95"]["macro_f1"]
    assert f"macro-F1 {f1:.3f} ({lo:.3f}-{hi:.3f}) (95% CI)" in head
    assert "chance is 0.250 for 4 classes present." in head
    assert ("**At chance.**" in head) is at_chance
    assert (lo <= 0.25) is at_chance


# ------------------------------------------------------------------------------ stats

def test_mcnemar_on_a_known_table():
    from math import comb

    from ensembles.evaluate.stats import mcnemar_from_counts
    # Discordant cells 6 and 16 (the classic 2x2 example [[59, 6], [16, 80]]).
    exact = mcnemar_from_counts(6, 16)
    assert exact["method"] == "exact binomial"
    assert exact["p_value"] == pytest.approx(2 * sum(comb(22, i) for i in range(7)) / 2 ** 22)
    assert exact["p_value"] == pytest.approx(0.0525, abs=5e-4)
    approx = mcnemar_from_counts(6, 16, exact=False)
    assert approx["statistic"] == pytest.approx(81 / 22)
    assert approx["p_value"] == pytest.approx(0.0550, abs=5e-4)
    assert mcnemar_from_counts(40, 40)["p_value"] == pytest.approx(1.0, abs=1e-9)
    assert mcnemar_from_counts(10, 40)["method"].startswith("chi-square")


def test_mcnemar_counts_discordant_pairs_from_labels():
    from ensembles.evaluate.stats import mcnemar
    y = np.array([0, 1, 2, 0, 1, 2, 0])
    a = np.array([0, 1, 2, 0, 0, 0, 1])    # right on 0..3
    b = np.array([0, 0, 0, 1, 1, 2, 1])    # right on 0, 4, 5
    out = mcnemar(y, a, b)
    assert (out["b"], out["c"]) == (3, 2)
    assert out["accuracy_a"] == pytest.approx(4 / 7) and out["accuracy_b"] == pytest.approx(3 / 7)


def test_paired_bootstrap_difference_ci_and_p_value():
    from ensembles.evaluate.stats import paired_bootstrap
    y, good = _noisy_predictions(300, signal=2.5, seed=8)
    _, bad = _noisy_predictions(300, signal=0.0, seed=9)
    same = paired_bootstrap(y, good, good, metric="accuracy", n_bootstrap=200)
    assert same["difference"] == 0 and same["ci95"] == [0.0, 0.0] and same["p_value"] == 1.0
    res = paired_bootstrap(y, good, bad, metric="macro_f1", n_bootstrap=300)
    assert res["a"] == pytest.approx(skm.f1_score(y, good.argmax(1), average="macro"))
    assert res["difference"] == pytest.approx(res["a"] - res["b"])
    assert 0 < res["ci95"][0] < res["difference"] < res["ci95"][1]
    assert res["p_value"] < 0.01
    with pytest.raises(ValueError, match="unknown metric"):
        paired_bootstrap(y, good, bad, metric="kappa")


def test_paired_bootstrap_resamples_patients():
    from ensembles.evaluate.stats import paired_bootstrap
    y1, a1 = _noisy_predictions(30, signal=1.5, seed=10)
    _, b1 = _noisy_predictions(30, signal=0.5, seed=11)
    y, a, b = np.repeat(y1, 8), np.repeat(a1, 8, axis=0), np.repeat(b1, 8, axis=0)
    ids = np.repeat([f"p{i}" for i in range(30)], 8)
    flat = paired_bootstrap(y, a, b, metric="accuracy", n_bootstrap=300)
    grouped = paired_bootstrap(y, a, b, metric="accuracy", patient_ids=ids, n_bootstrap=300)
    assert grouped["unit"] == "patient" and flat["unit"] == "example"
    width = lambda r: r["ci95"][1] - r["ci95"][0]  # noqa: E731
    assert width(grouped) > 2 * width(flat)


def test_explicit_decisions_drive_label_metrics_but_not_auc():
    y, p = _noisy_predictions(200, seed=12)
    rng = np.random.default_rng(12)
    decided = np.where(rng.random(200) < 0.3, (y + 1) % 4, p.argmax(1))
    m = evaluate_predictions(y, p, NAMES, y_pred=decided, n_bootstrap=100)
    base = evaluate_predictions(y, p, NAMES, n_bootstrap=0)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, decided))
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, decided, average="macro"))
    assert m["confusion_matrix"] == skm.confusion_matrix(y, decided).tolist()
    assert m["roc_auc_macro"] == base["roc_auc_macro"] and m["ece"] == base["ece"]
    assert m["ci95"]["accuracy"][0] < m["accuracy"] < m["ci95"]["accuracy"][1]
    with pytest.raises(ValueError, match="y_pred must lie"):
        evaluate_predictions(y, p, NAMES, y_pred=decided + 4, n_bootstrap=0)


def test_paired_bootstrap_uses_explicit_decisions():
    from ensembles.evaluate.stats import paired_bootstrap
    y, p = _noisy_predictions(200, seed=13)
    wrong = (y + 1) % 4
    res = paired_bootstrap(y, p, p, metric="accuracy", pred_b=wrong, n_bootstrap=100)
    assert res["b"] == 0.0 and res["a"] == pytest.approx(skm.accuracy_score(y, p.argmax(1)))
    assert res["p_value"] < 0.05


def test_one_class_test_set_reports_instead_of_crashing():
    y = np.array([2, 2, 2])
    m = evaluate_predictions(y, np.array([[0.1, 0.2, 0.7]] * 3), ["a", "b", "c"],
                             patient_ids=np.array(["x", "", "x"]), n_bootstrap=20)
    assert m["accuracy"] == 1.0 and m["roc_auc_macro"] is None
    assert m["ci95"]["roc_auc_macro"] is None
    assert m["per_class"]["c"]["specificity"] is None and len(m["warnings"]) == 3
    assert m["bootstrap"]["n_units"] == 2
