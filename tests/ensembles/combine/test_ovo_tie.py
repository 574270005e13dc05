"""OvO ties: a pair member at exactly [0.5, 0.5], and ties in the vote count.

The rule (ensembles.combine.combiners.OvOCombiner, scikit-learn's OneVsOneClassifier): a pair
(i, j) member's decision is its argmax, so an exact [0.5, 0.5] votes for the FIRST class i (as
a binary sklearn estimator does: LogisticRegression predicts class 1 only when its decision
value is > 0, GaussianNB takes argmax); its confidence still counts (P(j) = 0.5 with
confidence="proba", log P(j)/P(i) = 0 with "logit"). Ties in the vote count are broken by the
summed confidences mapped into (-1/3, 1/3), then by the lower class index (argmax).
"""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsOneClassifier

from ensembles.combine.combiners import OvOCombiner
from ensembles.combine.tasks import make_tasks

K3 = ("normal", "viral_pneumonia", "bacterial_pneumonia")
K4 = ("covid", "normal", "viral_pneumonia", "bacterial_pneumonia")
TIE = [0.5, 0.5]


def _members(*rows):
    """One example: member (i, j) in sklearn's pair order outputs [P(i), P(j)]."""
    return [np.array([r], dtype=np.float64) for r in rows]


def _votes(decision: np.ndarray) -> np.ndarray:
    """The vote counts inside sklearn's decision values (the confidence term is in (-1/3, 1/3))."""
    return np.rint(decision).astype(int)


def _expected_decision(votes, sums):
    votes, sums = np.asarray(votes, float), np.asarray(sums, float)
    return votes + sums / (3 * (np.abs(sums) + 1))


@pytest.mark.parametrize("confidence", ["proba", "logit"])
def test_an_exact_tie_votes_for_the_first_class_of_the_pair(confidence):
    # pairs (0,1), (0,2), (1,2): (0,1) tied, 0 beats 2, 1 beats 2.
    # The tie's vote for class 0 gives it 2 votes: class 0 wins outright.
    # (Voting for class 1 instead would give class 1 the 2 votes.)
    out = _members(TIE, [0.8, 0.2], [0.6, 0.4])
    comb = OvOCombiner(make_tasks("ovo", K3), confidence=confidence)
    d = comb.decision_function(out)[0]
    np.testing.assert_array_equal(_votes(d), [2, 1, 0])
    if confidence == "proba":                          # sums of P(j): -, to j; +, from i
        sums = [-0.5 - 0.2, 0.5 - 0.4, 0.2 + 0.4]
    else:                                              # the tie's logit is exactly 0
        a, b = np.log(0.2 / 0.8), np.log(0.4 / 0.6)
        sums = [-0.0 - a, 0.0 - b, a + b]
    np.testing.assert_allclose(d, _expected_decision([2, 1, 0], sums), rtol=1e-12)
    assert comb.predict(out)[0] == 0


def test_an_exact_tie_decides_a_vote_tie_through_its_confidence():
    # (0,1) tied -> class 0; (0,2): 2 wins; (1,2): 1 wins. One vote each: the summed P(j)
    # confidences decide, and the tie's 0.5 counts for class 1 and against class 0.
    out = _members(TIE, [0.3, 0.7], [0.6, 0.4])
    comb = OvOCombiner(make_tasks("ovo", K3))
    d = comb.decision_function(out)[0]
    np.testing.assert_array_equal(_votes(d), [1, 1, 1])
    sums = [-0.5 - 0.7, 0.5 - 0.4, 0.7 + 0.4]
    np.testing.assert_allclose(d, _expected_decision([1, 1, 1], sums), rtol=1e-12)
    assert comb.predict(out)[0] == 2


def test_every_pair_tied_gives_votes_by_class_index_and_uniform_probabilities():
    # Each tied pair (i, j) votes i: class c gets K-1-c votes, so class 0 wins.
    comb = OvOCombiner(make_tasks("ovo", K4), confidence="logit")
    out = _members(*[TIE] * 6)
    d = comb.decision_function(out)[0]
    np.testing.assert_array_equal(_votes(d), [3, 2, 1, 0])
    np.testing.assert_array_equal(d, [3.0, 2.0, 1.0, 0.0])   # logits all 0: no confidence term
    assert comb.predict(out)[0] == 0
    np.testing.assert_allclose(comb.predict_proba(out), np.full((1, 4), 0.25), atol=1e-12)


def test_a_tie_in_votes_and_confidences_goes_to_the_lower_class_index():
    # A vote cycle 0 > 1, 2 > 0, 1 > 2 with logits +-L that cancel exactly in every class's
    # sum: equal decision values, so the lowest index, class 0, wins.
    first, second = [0.7, 0.3], [0.3, 0.7]             # logits -L and +L exactly
    comb = OvOCombiner(make_tasks("ovo", K3), confidence="logit")
    out = _members(first, second, first)               # (0,1): 0; (0,2): 2; (1,2): 1
    d = comb.decision_function(out)[0]
    np.testing.assert_array_equal(d, [1.0, 1.0, 1.0])
    assert comb.predict(out)[0] == 0

    # 4 classes: 0 loses every pair (+L to 1, 2, 3), then the cycle 1 > 2, 3 > 1, 2 > 3.
    # Classes 1, 2, 3 have 2 votes and summed logits L each: class 1 wins, not class 0.
    comb4 = OvOCombiner(make_tasks("ovo", K4), confidence="logit")
    out4 = _members(second, second, second, first, second, first)
    d4 = comb4.decision_function(out4)[0]
    np.testing.assert_array_equal(_votes(d4), [0, 2, 2, 2])
    assert d4[1] == d4[2] == d4[3]
    L = np.log(0.7) - np.log(0.3)
    np.testing.assert_allclose(d4, _expected_decision([0, 2, 2, 2], [-3 * L, L, L, L]),
                               rtol=1e-12)
    assert comb4.predict(out4)[0] == 1

    # With P(j) confidences the same votes are broken by the sums (P(j) is added to j and
    # subtracted from i in every pair), which differ: class 3 wins.
    comb4p = OvOCombiner(make_tasks("ovo", K4), confidence="proba")
    sums = [-2.1, 0.7 - 0.3 - 0.7, 0.7 + 0.3 - 0.3, 0.7 + 0.7 + 0.3]
    np.testing.assert_allclose(comb4p.decision_function(out4)[0],
                               _expected_decision([0, 2, 2, 2], sums), rtol=1e-12)
    assert comb4p.predict(out4)[0] == 3


def _sklearn_ovo_from_logits(logits: np.ndarray, k: int) -> OneVsOneClassifier:
    """An sklearn OneVsOneClassifier whose pair estimator m has decision value logits[:, m]
    on X = logits (so an exact 0 is an exact tie, predict_proba [0.5, 0.5])."""
    n_pairs = k * (k - 1) // 2
    x_fit = np.random.default_rng(0).normal(size=(6 * k, n_pairs))
    ovo = OneVsOneClassifier(LogisticRegression()).fit(x_fit, np.arange(6 * k) % k)
    for m, est in enumerate(ovo.estimators_):
        est.coef_ = np.eye(n_pairs)[m][None]
        est.intercept_ = np.zeros(1)
    return ovo


@pytest.mark.parametrize("k", [3, 4])
def test_exact_ties_match_sklearn_one_vs_one(k):
    """sklearn as the oracle: rows with one, several or all pairs at exactly [0.5, 0.5]."""
    n_pairs = k * (k - 1) // 2
    rng = np.random.default_rng(k)
    x = rng.choice([-1.3, -0.4, 0.0, 0.4, 1.3], size=(200, n_pairs))
    x[:n_pairs] = np.where(np.eye(n_pairs, dtype=bool), 0.0, x[:n_pairs])   # one tie per row
    x[-1] = 0.0                                                                # all tied
    ovo = _sklearn_ovo_from_logits(x, k)
    outputs = [est.predict_proba(x) for est in ovo.estimators_]
    assert np.sum(np.concatenate(outputs) == 0.5) >= 2 * (np.sum(x == 0))    # exact ties
    comb = OvOCombiner(make_tasks("ovo", K4[:k]), confidence="logit")
    np.testing.assert_allclose(comb.decision_function(outputs), ovo.decision_function(x),
                               rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(comb.predict(outputs), ovo.predict(x))
