"""ensembles.combiners: OvA, OvO (sklearn's rule, pairwise coupling), cascade, soft voting."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import minimize
from sklearn.datasets import make_blobs
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsOneClassifier
from sklearn.naive_bayes import GaussianNB

from ensembles.combine.combiners import (
    CascadeCombiner,
    OvACombiner,
    OvOCombiner,
    cascade_proba,
    make_combiner,
    pairwise_coupling,
    sensitivity_threshold,
    soft_vote,
)
from ensembles.combine.tasks import make_tasks

K4 = ("covid", "normal", "viral_pneumonia", "bacterial_pneumonia")
K3 = ("normal", "viral_pneumonia", "bacterial_pneumonia")


def _random_binary_outputs(rng, n, m):
    p1 = rng.random((n, m))
    return [np.stack([1 - p1[:, i], p1[:, i]], axis=1) for i in range(m)]


def _assert_distribution(p, k):
    assert p.shape[1] == k
    assert np.all(p >= 0) and np.all(p <= 1)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-9)


@pytest.mark.parametrize("names", [K4, K3])
def test_ova_probabilities_and_every_class_reachable(names):
    k = len(names)
    comb = make_combiner(make_tasks("ova", names))
    assert isinstance(comb, OvACombiner)
    rng = np.random.default_rng(0)
    _assert_distribution(comb.predict_proba(_random_binary_outputs(rng, 50, k)), k)
    for c in range(k):
        scores = np.full(k, 0.3)
        scores[c] = 0.6
        outputs = [np.array([[1 - s, s]]) for s in scores]
        assert comb.predict(outputs)[0] == c
        np.testing.assert_allclose(comb.predict_proba(outputs)[0, c], 0.6 / (0.3 * (k - 1) + 0.6))
    # also when every member says "rest": still the least negative member wins
    low = [np.array([[0.9, 0.1]]), np.array([[0.8, 0.2]])] + [np.array([[0.95, 0.05]])] * (k - 2)
    assert comb.predict(low)[0] == 1
    zero = [np.array([[1.0, 0.0]])] * k
    np.testing.assert_allclose(comb.predict_proba(zero), np.full((1, k), 1 / k))


@pytest.mark.parametrize("estimator, confidence", [
    (LogisticRegression(C=0.05), "logit"), (GaussianNB(), "proba")])
@pytest.mark.parametrize("k", [3, 4])
def test_ovo_decisions_equal_sklearn_one_vs_one(estimator, confidence, k):
    x, y = make_blobs(n_samples=300, centers=k, cluster_std=4.0, random_state=k)
    ovo = OneVsOneClassifier(estimator).fit(x, y)
    outputs = [est.predict_proba(x) for est in ovo.estimators_]       # member (i,j): [P(i), P(j)]
    comb = OvOCombiner(make_tasks("ovo", K4[:k]), confidence=confidence)
    np.testing.assert_allclose(comb.decision_function(outputs), ovo.decision_function(x),
                               rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(comb.predict(outputs), ovo.predict(x))
    assert len(set(ovo.predict(x))) == k                                 # not a trivial case


def test_ovo_vote_ties_follow_sklearn_confidence_rule():
    # 3 classes, a perfect cycle of votes: 0 beats 1, 1 beats 2, 2 beats 0 -> tie on votes.
    # Sum of P(j) confidences: class 0: -(0.4) - (0.9) ... computed by sklearn's rule.
    out = [np.array([[0.6, 0.4]]), np.array([[0.1, 0.9]]), np.array([[0.7, 0.3]])]
    comb = OvOCombiner(make_tasks("ovo", K3))
    d = comb.decision_function(out)[0]
    sums = np.array([-0.4 - 0.9, 0.4 - 0.3, 0.9 + 0.3])
    np.testing.assert_allclose(d, 1 + sums / (3 * (np.abs(sums) + 1)))
    assert comb.predict(out)[0] == 2


def test_pairwise_coupling_recovers_a_known_distribution():
    rng = np.random.default_rng(1)
    p = rng.dirichlet(np.ones(4), size=20)
    r = p[:, :, None] / (p[:, :, None] + p[:, None, :])
    np.testing.assert_allclose(pairwise_coupling(r), p, atol=1e-6)


def test_pairwise_coupling_solves_the_wu_lin_weng_problem_for_inconsistent_pairs():
    rng = np.random.default_rng(2)
    k = 4
    r = rng.uniform(0.05, 0.95, size=(k, k))
    r = np.triu(r, 1) + np.tril(1 - r.T, -1)                             # r_ji = 1 - r_ij
    got = pairwise_coupling(r[None])[0]

    def objective(q):
        return sum((r[j, i] * q[i] - r[i, j] * q[j]) ** 2
                   for i in range(k) for j in range(k) if i != j)

    ref = minimize(objective, np.full(k, 1 / k), method="SLSQP", bounds=[(0, 1)] * k,
                   constraints={"type": "eq", "fun": lambda q: q.sum() - 1}, tol=1e-12).x
    np.testing.assert_allclose(got, ref, atol=1e-5)
    _assert_distribution(got[None], k)


def test_ovo_coupled_probabilities_match_members_built_from_a_distribution():
    rng = np.random.default_rng(3)
    p = rng.dirichlet(np.ones(4), size=30)
    tasks = make_tasks("ovo", K4)
    outputs = [p[:, [i, j]] / p[:, [i, j]].sum(axis=1, keepdims=True)
               for i in range(4) for j in range(i + 1, 4)]
    comb = OvOCombiner(tasks, decision="coupling")
    proba = comb.predict_proba(outputs)
    _assert_distribution(proba, 4)
    np.testing.assert_allclose(proba, p, atol=1e-6)
    np.testing.assert_array_equal(comb.predict(outputs), p.argmax(axis=1))


def test_cascade_product_rule():
    tasks = make_tasks("cascade", K4)                                    # healthy = normal = 1
    s = np.array([0.2, 0.9])
    q = np.array([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    p = cascade_proba(s, q, tasks.healthy)
    np.testing.assert_allclose(p, [[0.1, 0.8, 0.06, 0.04], [0.09, 0.1, 0.09, 0.72]])
    comb = CascadeCombiner(tasks)
    outputs = [np.stack([1 - s, s], axis=1), q]
    np.testing.assert_allclose(comb.predict_proba(outputs), p)
    assert comb.predict(outputs).tolist() == [1, 3]
    rng = np.random.default_rng(4)
    _assert_distribution(comb.predict_proba(
        [_random_binary_outputs(rng, 40, 1)[0], rng.dirichlet(np.ones(3), 40)]), 4)


def test_cascade_threshold_hits_target_sensitivity_on_validation():
    rng = np.random.default_rng(5)
    tasks = make_tasks("cascade", K3)                                    # healthy = 0
    y = rng.integers(0, 3, 400)
    sick = y != 0
    s = np.clip(rng.normal(0.35 + 0.3 * sick, 0.2), 0, 1)
    outputs = [np.stack([1 - s, s], axis=1), rng.dirichlet(np.ones(2), 400)]
    for target in (0.8, 0.95, 0.99):
        comb = CascadeCombiner(tasks, target_sensitivity=target).fit(outputs, y)
        pred_sick = comb.predict(outputs) != 0
        sensitivity = pred_sick[sick].mean()
        assert sensitivity >= target
        assert sensitivity - target < 2 / sick.sum()                   # the largest such threshold
        _assert_distribution(comb.predict_proba(outputs), 3)
        p = comb.predict_proba(outputs)
        np.testing.assert_array_equal(p[:, 0] <= 0.5, s >= comb.threshold_)
    assert CascadeCombiner(tasks, target_sensitivity=0.99).fit(outputs, y).threshold_ < \
        CascadeCombiner(tasks, target_sensitivity=0.8).fit(outputs, y).threshold_
    scores, sick = np.array([0.1, 0.5, 0.9, 0.2]), np.array([1, 1, 1, 0])
    assert sensitivity_threshold(scores, sick, 2 / 3) == 0.5


def test_soft_vote_and_errors():
    a = np.array([[0.2, 0.8], [0.6, 0.4]])
    b = np.array([[0.6, 0.4], [0.2, 0.8]])
    np.testing.assert_allclose(soft_vote([a, b]), [[0.4, 0.6], [0.4, 0.6]])
    np.testing.assert_allclose(soft_vote([a, b], weights=[3, 1]), [[0.3, 0.7], [0.5, 0.5]])
    with pytest.raises(ValueError, match="one non-negative weight"):
        soft_vote([a, b], weights=[1])
    with pytest.raises(ValueError, match="needs ova tasks"):
        OvACombiner(make_tasks("ovo", K3))
    with pytest.raises(ValueError, match="expected outputs of 3 members"):
        OvACombiner(make_tasks("ova", K3)).predict_proba([a, b])
    with pytest.raises(ValueError, match="probabilities"):
        OvACombiner(make_tasks("ova", K3)).predict_proba([a, b, a * 2])


@pytest.mark.parametrize("strategy", ["single", "ova", "ovo", "cascade"])
def test_members_trained_from_the_tables_combine_into_a_good_classifier(strategy):
    # End to end: tables -> member labels/masks -> fit -> combine. Gaussian members, since a
    # linear healthy-vs-sick member cannot cut the middle blob out of the others.
    x, y = make_blobs(n_samples=400, centers=4, cluster_std=2.0, random_state=7)
    tasks = make_tasks(strategy, K4)
    labels, mask = tasks.member_labels(y)
    outputs = [GaussianNB().fit(x[mask[m]], labels[m][mask[m]]).predict_proba(x)
               for m in range(tasks.num_members)]
    comb = make_combiner(tasks).fit(outputs, y)
    proba = comb.predict_proba(outputs)
    _assert_distribution(proba, 4)
    assert (comb.predict(outputs) == y).mean() > 0.9
    assert (proba.argmax(1) == y).mean() > 0.9
