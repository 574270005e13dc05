"""ensembles.comparison and the comparison statistics (ensembles.stats.holm, sign_flip_test)
on hand-made values and on hand-written run folders: variants recomputed from saved member
outputs, cost and learning curves from metrics.jsonl, Holm over each backbone's family."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ensembles.config import make_config
from ensembles.evaluate.stats import holm, sign_flip_test
from ensembles.research import comparison


def test_holm_by_hand():
    # sorted 0.01, 0.02, 0.03, 0.04 -> x4, x3, x2, x1 = 0.04, 0.06, 0.06, 0.04 -> running max
    assert holm([0.03, 0.01, 0.04, 0.02]) == pytest.approx([0.06, 0.04, 0.06, 0.06])
    # capped at 1, NaN left out of the family (m = 2 here)
    out = holm([0.6, float("nan"), 0.2])
    assert out[0] == pytest.approx(0.6) and np.isnan(out[1]) and out[2] == pytest.approx(0.4)
    assert holm([0.9, 0.8]) == [1.0, 1.0]


def test_holm_matches_statsmodels_values():
    # statsmodels.stats.multitest.multipletests(p, method="holm")[1], written down by hand
    p = [0.01, 0.04, 0.03, 0.005, 0.2]
    assert holm(p) == pytest.approx([0.04, 0.09, 0.09, 0.025, 0.2])
    with pytest.raises(ValueError):
        holm([1.5])


def test_sign_flip_test_enumerates_every_flip():
    # 3 seeds all better: only all-plus and all-minus reach |mean| -> 2 / 8
    t = sign_flip_test([0.02, 0.05, 0.01])
    assert (t["p_value"], t["min_p"], t["n"]) == (0.25, 0.25, 3)
    assert t["mean_difference"] == pytest.approx(0.08 / 3)
    # one seed the other way: observed sum 0.11; the 8 flips' |sums| are .11 (+++), .07 (++-),
    # .13 (+-+), .09 (+--) and the same for their negations; >= .11: 4 of 8
    t = sign_flip_test([0.10, -0.01, 0.02])
    assert t["p_value"] == 0.5
    assert sign_flip_test([0.0, 0.0])["p_value"] == 1.0


def _write_records(directory, records) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_cost_and_curves_from_metrics_jsonl(tmp_path):
    run = tmp_path / "run"
    config = make_config("ova", backbone="simple_cnn", head_epochs=1)
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"config": config.to_dict()}))
    # a stacked pair for 2 epochs, then a member trained alone for 1: 2 * 2 + 1 = 5
    _write_records(run, [
        {"epoch": 1, "members": ["a", "b"], "seconds": 1.5, "val_macro_f1": [0.2, 0.3]},
        {"epoch": 2, "members": ["a", "b"], "seconds": 1.0, "val_macro_f1": [0.4, 0.5]},
        {"epoch": 1, "members": ["c"], "seconds": 0.25, "val_macro_f1": [0.6]}])
    _write_records(run / "head", [{"epoch": 1, "members": ["a", "b", "c"], "seconds": 2.0}])
    assert comparison.training_cost(run) == {"member_epochs": 8, "train_seconds": 4.75}
    assert comparison.learning_curves(run) == {"a": [(1, 0.2), (2, 0.4)],
                                               "b": [(1, 0.3), (2, 0.5)], "c": [(1, 0.6)]}
    # a stack costs the runs it stacks
    stack = tmp_path / "stack"
    stack.mkdir()
    (stack / "config.json").write_text(json.dumps({"runs": [str(run), str(run)]}))
    assert comparison.training_cost(stack) == {"member_epochs": 16, "train_seconds": 9.5}


def _row(variant, backbone, seed, f1, pred, y):
    k = 3
    proba = np.eye(k)[pred] * 0.7 + 0.1
    return {"variant": variant, "backbone": backbone, "seed": seed, "macro_f1": f1,
            "y": y, "pred": pred, "proba": proba, "ids": None}


def test_tests_against_the_baseline_with_holm_per_backbone():
    y = np.repeat([0, 1, 2], 10)
    wrong = y.copy()
    wrong[:12] = (wrong[:12] + 1) % 3      # 12 errors the baseline does not make
    rows = [_row(v, b, s, f1, p, y)
            for b in ("cnn", "resnet") for s in (0, 1, 2)
            for v, f1, p in (("single", 0.5, y), ("ova", 0.6 + 0.01 * s, wrong),
                             ("ova+meta", 0.5 - 0.01 * (s - 1), y))]
    paired = comparison.paired_tests(rows, "single", n_bootstrap=50)
    assert len(paired) == 12 and {t["baseline"] for t in paired} == {"single"}
    for b in ("cnn", "resnet"):
        family = [t for t in paired if t["backbone"] == b]
        for key in ("mcnemar_p", "bootstrap_p"):
            assert [t[f"{key}_holm"] for t in family] == pytest.approx(
                holm([t[key] for t in family]))
    ova = [t for t in paired if t["variant"] == "ova"]
    # 0 vs 12 discordant pairs: exact binomial 2 / 2^12, times 6 (the smallest of 6 in family)
    assert ova[0]["mcnemar_p"] == pytest.approx(2 / 2 ** 12)
    assert ova[0]["mcnemar_p_holm"] == pytest.approx(6 * 2 / 2 ** 12)
    seeds = comparison.across_seed_tests(rows, "single")
    assert [(t["variant"], t["backbone"], t["seeds"]) for t in seeds] == [
        ("ova", "cnn", [0, 1, 2]), ("ova+meta", "cnn", [0, 1, 2]),
        ("ova", "resnet", [0, 1, 2]), ("ova+meta", "resnet", [0, 1, 2])]
    by = {(t["variant"], t["backbone"]): t for t in seeds}
    assert by["ova", "cnn"]["mean_diff"] == pytest.approx(0.11)
    assert by["ova", "cnn"]["p"] == 0.25 and by["ova", "cnn"]["p_holm"] == 0.5
    # differences +0.01, 0, -0.01: every flip reaches |mean| 0 -> p = 1
    assert by["ova+meta", "cnn"]["p"] == 1.0 and by["ova+meta", "cnn"]["p_holm"] == 1.0


CLASSES = ("covid", "normal", "viral_pneumonia")   # cascade: normal (1) is the healthy class


def _fake_run(path, strategy, val, y_val, test, **settings):
    """A run folder with only what the analysis reads: config.json and outputs.npz."""
    path.mkdir()
    config = make_config(strategy, backbone="simple_cnn", **settings)
    (path / "config.json").write_text(json.dumps({"config": config.to_dict()}))
    np.savez(path / "outputs.npz", class_names=np.array(CLASSES),
             train_indices=np.arange(100, 110), val_index=np.arange(len(y_val)),
             val_label=np.asarray(y_val), test_label=np.zeros(len(test[0]), int),
             **{f"val_member_{m}": v for m, v in enumerate(val)},
             **{f"test_member_{m}": t for m, t in enumerate(test)})
    return path


def _pairs(rows):
    """Per-member [N, 2] outputs from rows of (P(i) of pair 0, pair 1, pair 2)."""
    r = np.asarray(rows, float)
    return [np.stack([r[:, m], 1 - r[:, m]], axis=1) for m in range(r.shape[1])]


def test_ovo_variants_votes_and_coupling(tmp_path):
    # pairs (covid, normal), (covid, viral), (normal, viral): covid narrowly wins both its
    # pairs (2 votes: "ovo-votes" says covid), normal crushes viral, so coupling puts the
    # most mass on normal
    test = _pairs([[0.51, 0.51, 0.99], [0.1, 0.9, 0.9]])
    val = _pairs([[0.9, 0.9, 0.5], [0.1, 0.5, 0.9], [0.5, 0.1, 0.1]] * 2)
    run = _fake_run(tmp_path / "ovo", "ovo", val, [0, 1, 2] * 2, test, ovo_decision="coupling")
    assert comparison.own_variant(run) == "ovo-coupling"
    v = {x.name: x for x in comparison.variants(run)}
    assert list(v) == ["ovo-votes", "ovo-coupling", "ovo+meta"]
    # second example: normal beats covid (0.9) and viral (0.9 of its pair): 2 votes
    assert v["ovo-votes"].test_pred.tolist() == [0, 1]
    assert v["ovo-coupling"].test_pred.tolist() == [1, 1]
    np.testing.assert_array_equal(v["ovo-votes"].test_proba, v["ovo-coupling"].test_proba)
    assert v["ovo-coupling"].test_proba[0].argmax() == 1


def test_cascade_tuned_threshold_and_meta_by_hand(tmp_path):
    from sklearn.linear_model import LogisticRegression

    # stage 1 P(sick) of the 4 sick validation examples: 0.9, 0.8, 0.3, 0.2; target 0.75 keeps
    # ceil(0.75 * 4) = 3 of them: threshold 0.3
    s_val = np.array([0.9, 0.8, 0.3, 0.2, 0.1, 0.05])
    y_val = np.array([0, 2, 0, 2, 1, 1])
    q_val = np.array([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.4, 0.6], [0.5, 0.5], [0.5, 0.5]])
    s_test, q_test = np.array([0.4, 0.6, 0.1]), np.array([[0.3, 0.7], [0.9, 0.1], [0.2, 0.8]])
    val = [np.stack([1 - s_val, s_val], 1), q_val]
    test = [np.stack([1 - s_test, s_test], 1), q_test]
    run = _fake_run(tmp_path / "cascade", "cascade", val, y_val, test, target_sensitivity=0.75)
    v = {x.name: x for x in comparison.variants(run)}
    assert list(v) == ["cascade", "cascade-tuned", "cascade+meta"]
    assert v["cascade"].test_pred.tolist() == [1, 0, 1]          # sick from 0.5
    assert v["cascade-tuned"].test_pred.tolist() == [2, 0, 1]    # sick from 0.3
    # +meta: scikit-learn's logistic regression on the concatenated validation outputs
    x_val, x_test = np.concatenate(val, axis=1), np.concatenate(test, axis=1)
    ref = LogisticRegression(C=1.0, max_iter=2000).fit(x_val, y_val).predict_proba(x_test)
    np.testing.assert_allclose(v["cascade+meta"].test_proba, ref, atol=1e-6)
    np.testing.assert_array_equal(v["cascade+meta"].test_pred, ref.argmax(1))
    # a validation row that was a training example is refused
    z = dict(np.load(run / "outputs.npz"))
    z["train_indices"] = np.array([3, 100])
    np.savez(run / "outputs.npz", **z)
    with pytest.raises(ValueError, match="leakage: 1 of 6"):
        comparison.variants(run)
