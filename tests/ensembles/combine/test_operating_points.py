"""Operating points and decision explanations: thresholds meet their validation target (checked
against a brute-force search over every candidate threshold), their rates and CIs, the
parsing of the flag, and the columns that say why each cascade / OvO decision was made."""

from __future__ import annotations

import numpy as np
import pytest

from ensembles import make_config
from ensembles.combine.combiners import CascadeCombiner, OvOCombiner
from ensembles.combine.explain import decision_columns
from ensembles.combine.operating_points import choose_thresholds, flag
from ensembles.combine.tasks import make_tasks
from ensembles.config import OperatingPoint, parse_operating_point
from ensembles.evaluate.operating_points import rates
from experiments import ensemble_cli

NAMES = ("covid", "normal", "viral_pneumonia", "bacterial_pneumonia")


def _scores(seed: int = 0, n: int = 300, k: int = 4):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[y]
    p = np.exp(logits)
    return y, p / p.sum(1, keepdims=True)


def _brute(pos: np.ndarray, s: np.ndarray, op: OperatingPoint) -> float:
    """The threshold by exhaustive search over every distinct score (independent of
    roc_curve): flags are s >= t."""
    cands = np.unique(s)
    sens = np.array([np.mean(s[pos] >= t) for t in cands])
    spec = np.array([np.mean(s[~pos] < t) for t in cands])
    if op.target == "sensitivity":
        return float(cands[sens >= op.value].max())
    if op.target == "specificity":
        return float(cands[spec >= op.value].min())
    return float(cands[np.argmax(sens + spec)])


@pytest.mark.parametrize("op", [OperatingPoint("sensitivity", 0.95),
                                OperatingPoint("sensitivity", 0.8),
                                OperatingPoint("specificity", 0.9),
                                OperatingPoint("youden")])
def test_thresholds_are_the_best_that_meet_the_target(op):
    y, proba = _scores()
    thresholds = choose_thresholds(y, proba, op)
    for k, t in enumerate(thresholds):
        pos, s = y == k, proba[:, k]
        sens, spec = np.mean(s[pos] >= t), np.mean(s[~pos] < t)
        want = _brute(pos, s, op)
        if op.target == "youden":   # ties may pick another threshold of the same J
            best = np.mean(s[pos] >= want) + np.mean(s[~pos] < want)
            assert sens + spec == pytest.approx(best)
        else:
            assert t == pytest.approx(want)
            assert (sens if op.target == "sensitivity" else spec) >= op.value


def test_a_class_without_validation_positives_gets_no_threshold_and_no_flags():
    y, proba = _scores()
    y = np.where(y == 2, 0, y)                        # no viral example left
    thresholds = choose_thresholds(y, proba, OperatingPoint("youden"))
    assert thresholds[2] is None and all(t is not None for i, t in enumerate(thresholds)
                                         if i != 2)
    assert not flag(proba, thresholds)[:, 2].any()
    r = rates(y, proba, thresholds, NAMES, n_bootstrap=0)
    assert r["viral_pneumonia"]["sensitivity"] is None


def test_rates_count_flags_and_their_cis_resample_patients():
    y, proba = _scores(seed=1)
    thresholds = choose_thresholds(y, proba, OperatingPoint("sensitivity", 0.9))
    ids = np.repeat(np.arange(len(y) // 3), 3).astype(str)          # 3 images per patient
    r = rates(y, proba, thresholds, NAMES, patient_ids=ids, seed=0, n_bootstrap=300)
    hits = flag(proba, thresholds)
    for k, name in enumerate(NAMES):
        e = r[name]
        assert e["sensitivity"] == pytest.approx(np.mean(hits[y == k, k]))
        assert e["specificity"] == pytest.approx(np.mean(~hits[y != k, k]))
        assert e["positives"] == np.sum(y == k)
        lo, hi = e["sensitivity_ci95"]
        assert lo <= e["sensitivity"] <= hi and hi - lo > 0.01


@pytest.mark.parametrize("text,want", [("youden", OperatingPoint("youden")),
                                       ("sensitivity=0.95", OperatingPoint("sensitivity", 0.95)),
                                       ("specificity=1", OperatingPoint("specificity", 1.0))])
def test_parse_operating_point(text, want):
    assert parse_operating_point(text) == want
    assert parse_operating_point(str(want)) == want


@pytest.mark.parametrize("bad", ["sensitivity", "sensitivity=0", "specificity=1.5", "ppv=0.9",
                                 "youden=0.5", "sensitivity=abc"])
def test_bad_operating_points_are_refused(bad, capsys):
    with pytest.raises(ValueError, match="operating point"):
        parse_operating_point(bad)
    with pytest.raises(ValueError, match="operating point"):
        make_config("ova", backbone="simple_cnn", operating_point=bad)
    assert ensemble_cli.main("ova", "", ["--backbone", "simple_cnn", "--operating-point", bad,
                                         "--out", "/nonexistent/never"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "operating point" in err[0]


def test_cascade_columns_explain_decisions_that_differ_from_the_highest_probability():
    tasks = make_tasks("cascade", NAMES)
    combiner = CascadeCombiner(tasks, threshold=0.3)
    s = np.array([0.35, 0.1, 0.9])                   # P(sick) per image
    q = np.array([[0.34, 0.33, 0.33], [0.2, 0.3, 0.5], [0.1, 0.8, 0.1]])   # sick types
    members = [np.stack([1 - s, s], 1), q]
    cols = decision_columns(combiner, members, NAMES)
    pred, proba = combiner.predict(members), combiner.predict_proba(members)
    np.testing.assert_allclose(cols["p_sick"], s)
    np.testing.assert_allclose(cols["stage1_threshold"], 0.3)
    # row 0: sick by stage 1 (0.35 >= 0.3) though normal has the highest listed probability
    assert NAMES[pred[0]] == "covid" and NAMES[proba[0].argmax()] == "normal"
    assert cols["decided_by"][0].startswith("stage 1: P(sick) 0.350 >= 0.300")
    assert "covid" in cols["decided_by"][0]
    assert cols["decided_by"][1] == "stage 1: P(sick) 0.100 < 0.300: normal"
    assert NAMES[pred[1]] == "normal"


def test_ovo_columns_count_the_votes_of_the_rule():
    tasks = make_tasks("ovo", NAMES[:3])
    combiner = OvOCombiner(tasks)
    rng = np.random.default_rng(0)
    members = [np.stack([1 - a, a], 1) for a in rng.uniform(size=(3, 50))]
    cols = decision_columns(combiner, members, NAMES[:3])
    votes = np.array([[int(part.rsplit(" ", 1)[1]) for part in row.split("; ")]
                      for row in cols["ovo_votes"]])
    assert (votes.sum(1) == 3).all()
    decision = combiner.decision_function(members)
    np.testing.assert_array_equal(votes, np.rint(decision).astype(int))
    pred = combiner.predict(members)
    assert (votes[np.arange(50), pred] == votes.max(1)).all()
    tied = (votes == votes.max(1, keepdims=True)).sum(1) > 1
    assert tied.any() and all(("tie" in r) == t for r, t in zip(cols["decided_by"], tied,
                                                                 strict=True))
