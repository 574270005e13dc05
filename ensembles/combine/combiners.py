"""Combiners: member probabilities -> K-class probabilities and decisions.

Member outputs are per-member probability arrays, a sequence of [N, C_m] or one [N, M, C]
array, in the member order of `ensembles.combine.tasks.make_tasks`. The combiners are scikit-learn
style (`fit`, `predict_proba`, `predict`); only the thresholded cascade learns anything
(its stage-1 threshold, from validation outputs).

- OvA: the members' positive-class scores, normalised to sum to 1 (argmax = the most confident
  member, so every class is reachable).
- OvO: `predict` is scikit-learn's OneVsOneClassifier rule exactly (votes, ties broken by the
  normalised sum of confidences); `predict_proba` is pairwise coupling (Wu, Lin & Weng 2004,
  method 2, as in libsvm), solved as its linear system.
- Cascade: P(healthy) = 1 - s, P(sick class k) = s * q_k; `predict` follows the stages
  (sick when s >= threshold, then the most likely sick class).
- Soft voting: the (weighted) mean of several models' K-class probabilities.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ensembles.combine.tasks import Tasks

# libsvm clips pairwise probabilities away from 0 and 1 before coupling.
_MIN_PROB = 1e-7


def as_member_list(outputs, num_members: int | None = None) -> list[np.ndarray]:
    """Per-member float64 [N, C_m] arrays from a sequence of arrays or one [N, M, C] array."""
    if isinstance(outputs, np.ndarray) and outputs.ndim == 3:
        members = [outputs[:, m] for m in range(outputs.shape[1])]
    else:
        members = list(outputs)
    members = [np.asarray(p, dtype=np.float64) for p in members]
    if num_members is not None and len(members) != num_members:
        raise ValueError(f"expected outputs of {num_members} members, got {len(members)}")
    if not members or any(p.ndim != 2 or len(p) != len(members[0]) for p in members):
        raise ValueError("member outputs must be [N, C_m] arrays with the same N")
    for p in members:
        if not np.all(np.isfinite(p)) or p.min() < 0 or p.max() > 1:
            raise ValueError("member outputs must be probabilities: finite and within [0, 1]")
    return members


def _check_strategy(tasks: Tasks, strategy: str) -> None:
    if tasks.strategy != strategy:
        raise ValueError(f"a {strategy} combiner needs {strategy} tasks, got {tasks.strategy!r}")


# ------------------------------------------------------------------------------------ OvA

def ova_proba(positive_scores: np.ndarray) -> np.ndarray:
    """K-class probabilities from OvA positive-class scores [N, K]: each row divided by its sum.

    A row of all zeros (no member claims the example) becomes uniform.
    """
    s = np.asarray(positive_scores, dtype=np.float64)
    total = s.sum(axis=1, keepdims=True)
    k = s.shape[1]
    return np.where(total > 0, s / np.where(total > 0, total, 1.0), 1.0 / k)


class OvACombiner:
    """One-vs-all: member k's P(class k) scores, normalised across members."""

    def __init__(self, tasks: Tasks):
        _check_strategy(tasks, "ova")
        self.tasks = tasks

    def fit(self, member_outputs=None, y=None) -> OvACombiner:
        return self

    def predict_proba(self, member_outputs) -> np.ndarray:
        members = as_member_list(member_outputs, self.tasks.num_members)
        return ova_proba(np.stack([p[:, 1] for p in members], axis=1))

    def predict(self, member_outputs) -> np.ndarray:
        return self.predict_proba(member_outputs).argmax(axis=1)


# ------------------------------------------------------------------------------------ OvO

def ovo_decision_function(predictions: np.ndarray, confidences: np.ndarray,
                          n_classes: int) -> np.ndarray:
    """scikit-learn's OvO decision: votes plus the sum of confidences mapped into (-1/3, 1/3).

    `predictions` [N, P] is each pair member's 0/1 decision (1 = the second class j of pair
    (i, j)); `confidences` [N, P] its decision value or P(j); pairs in i < j order. Same
    arithmetic as sklearn.utils.multiclass._ovr_decision_function, vectorised.
    """
    pairs = [(i, j) for i in range(n_classes) for j in range(i + 1, n_classes)]
    if predictions.shape[1] != len(pairs) or confidences.shape != predictions.shape:
        raise ValueError(f"{n_classes} classes need {len(pairs)} pair members; got "
                         f"{predictions.shape[1]} predictions, {confidences.shape[1]} confidences")
    first = np.zeros((len(pairs), n_classes))
    second = np.zeros((len(pairs), n_classes))
    for k, (i, j) in enumerate(pairs):
        first[k, i], second[k, j] = 1.0, 1.0
    votes = (predictions == 0) @ first + (predictions == 1) @ second
    sums = confidences @ (second - first)
    return votes + sums / (3 * (np.abs(sums) + 1))


def pairwise_coupling(r: np.ndarray) -> np.ndarray:
    """Class probabilities [N, K] from pairwise probabilities r [N, K, K], r_ij = P(i | i or j).

    Wu, Lin & Weng (2004) method 2, as in libsvm: minimise sum_{i<j} (r_ji p_i - r_ij p_j)^2
    subject to sum(p) = 1, i.e. solve [[Q, 1], [1^T, 0]] [p; b] = [0; 1] with
    Q_tt = sum_{j!=t} r_jt^2 and Q_tj = -r_jt r_tj. Pairwise values are clipped to
    [1e-7, 1 - 1e-7] as libsvm does; the diagonal of r is ignored.
    """
    r = np.clip(np.asarray(r, dtype=np.float64), _MIN_PROB, 1 - _MIN_PROB)
    n, k, _ = r.shape
    off = ~np.eye(k, dtype=bool)
    rt = np.swapaxes(r, 1, 2)                                # rt[:, t, j] = r_jt
    q = np.where(off, -rt * r, 0.0)
    q[:, np.arange(k), np.arange(k)] = np.sum(np.where(off, rt ** 2, 0.0), axis=2)
    system = np.zeros((n, k + 1, k + 1))
    system[:, :k, :k] = q
    system[:, :k, k] = system[:, k, :k] = 1.0
    rhs = np.zeros((n, k + 1))
    rhs[:, k] = 1.0
    p = np.linalg.solve(system, rhs[..., None])[:, :k, 0]
    p = np.clip(p, 0.0, None)                                  # round-off only
    return p / p.sum(axis=1, keepdims=True)


class OvOCombiner:
    """One-vs-one over sklearn's pair order: member (i, j) outputs [P(i), P(j)].

    confidence="proba" uses P(j) as the tie-break confidence (sklearn's choice for estimators
    without decision_function); "logit" uses log P(j) / P(i) (the decision value of a logistic
    model). decision="votes" predicts by sklearn's vote rule, "coupling" by the argmax of the
    coupled probabilities; `predict_proba` is always pairwise coupling.
    """

    def __init__(self, tasks: Tasks, *, confidence: str = "proba", decision: str = "votes"):
        _check_strategy(tasks, "ovo")
        if confidence not in ("proba", "logit"):
            raise ValueError(f"confidence must be 'proba' or 'logit', got {confidence!r}")
        if decision not in ("votes", "coupling"):
            raise ValueError(f"decision must be 'votes' or 'coupling', got {decision!r}")
        self.tasks, self.confidence, self.decision = tasks, confidence, decision
        self.pairs = [tuple(int(g[0]) for g in tasks.groups(m)) for m in range(tasks.num_members)]

    def fit(self, member_outputs=None, y=None) -> OvOCombiner:
        return self

    def decision_function(self, member_outputs) -> np.ndarray:
        members = as_member_list(member_outputs, self.tasks.num_members)
        p0 = np.stack([p[:, 0] for p in members], axis=1)
        p1 = np.stack([p[:, 1] for p in members], axis=1)
        predictions = (p1 > p0).astype(int)                     # argmax, ties to class i
        if self.confidence == "proba":
            conf = p1
        else:
            conf = np.log(np.clip(p1, _MIN_PROB, None)) - np.log(np.clip(p0, _MIN_PROB, None))
        return ovo_decision_function(predictions, conf, len(self.tasks.class_names))

    def predict_proba(self, member_outputs) -> np.ndarray:
        members = as_member_list(member_outputs, self.tasks.num_members)
        k = len(self.tasks.class_names)
        r = np.full((len(members[0]), k, k), 0.5)
        for p, (i, j) in zip(members, self.pairs, strict=True):
            pij = p[:, 0] / np.clip(p[:, 0] + p[:, 1], _MIN_PROB, None)
            r[:, i, j], r[:, j, i] = pij, 1.0 - pij
        return pairwise_coupling(r)

    def predict(self, member_outputs) -> np.ndarray:
        if self.decision == "votes":
            return self.decision_function(member_outputs).argmax(axis=1)
        return self.predict_proba(member_outputs).argmax(axis=1)


# -------------------------------------------------------------------------------- cascade

def cascade_proba(sick: np.ndarray, sick_type: np.ndarray, healthy: int) -> np.ndarray:
    """K-class probabilities: P(healthy) = 1 - s, P(sick class k) = s * q_k.

    `sick` [N] is stage 1's P(sick); `sick_type` [N, K-1] stage 2's distribution over the sick
    classes in their original order; `healthy` the healthy class's index among the K.
    """
    s = np.asarray(sick, dtype=np.float64)[:, None]
    q = np.asarray(sick_type, dtype=np.float64)
    return np.insert(s * q, healthy, 1.0 - s[:, 0], axis=1)


def sensitivity_threshold(sick_scores: np.ndarray, is_sick: np.ndarray,
                          target: float) -> float:
    """The largest threshold t with sensitivity mean(s[sick] >= t) >= target on these examples.

    A larger t flags fewer healthy people, so the largest t meeting the target keeps the most
    specificity.
    """
    if not 0 < target <= 1:
        raise ValueError(f"target sensitivity must be in (0, 1], got {target}")
    pos = np.sort(np.asarray(sick_scores, dtype=np.float64)[np.asarray(is_sick, dtype=bool)])
    if len(pos) == 0:
        raise ValueError("no sick example to tune the threshold on")
    # Keep at least ceil(target * n) positives: t = the score of the one at that rank.
    need = int(np.ceil(target * len(pos) - 1e-9))
    return float(pos[len(pos) - need])


class CascadeCombiner:
    """Healthy-vs-sick stage, then the sick type.

    threshold=0.5 by default; `fit(val_outputs, y_val)` with `target_sensitivity` set tunes it
    on validation to the largest stage-1 threshold whose sensitivity for 'sick' meets the
    target. `predict` follows the stages; `predict_proba` is the product rule with s mapped
    piecewise-linearly so that the threshold sits at 0.5 (unchanged when threshold = 0.5).
    Note: argmax(predict_proba) can differ from `predict` (sick mass is split over K-1 types);
    report label metrics from `predict`.
    """

    def __init__(self, tasks: Tasks, *, threshold: float = 0.5,
                 target_sensitivity: float | None = None):
        _check_strategy(tasks, "cascade")
        if not 0 < threshold < 1:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        self.tasks, self.threshold, self.target_sensitivity = tasks, threshold, target_sensitivity
        self.threshold_ = threshold

    def fit(self, member_outputs=None, y=None) -> CascadeCombiner:
        """Tune the stage-1 threshold on validation outputs when a target sensitivity is set."""
        if self.target_sensitivity is None:
            self.threshold_ = self.threshold
            return self
        if member_outputs is None or y is None:
            raise ValueError("tuning the cascade threshold needs validation outputs and labels")
        stage1, _ = as_member_list(member_outputs, 2)
        t = sensitivity_threshold(stage1[:, 1], np.asarray(y) != self.tasks.healthy,
                                  self.target_sensitivity)
        self.threshold_ = float(np.clip(t, _MIN_PROB, 1 - _MIN_PROB))
        return self

    def _stages(self, member_outputs) -> tuple[np.ndarray, np.ndarray]:
        stage1, stage2 = as_member_list(member_outputs, 2)
        k = len(self.tasks.class_names)
        if stage1.shape[1] != 2 or stage2.shape[1] != k - 1:
            raise ValueError(f"cascade outputs must be [N, 2] and [N, {k - 1}]; "
                             f"got {stage1.shape} and {stage2.shape}")
        return stage1[:, 1], stage2

    def predict_proba(self, member_outputs) -> np.ndarray:
        s, q = self._stages(member_outputs)
        t = self.threshold_
        s = np.where(s < t, 0.5 * s / t, 0.5 + 0.5 * (s - t) / (1 - t))
        return cascade_proba(s, q, self.tasks.healthy)

    def predict(self, member_outputs) -> np.ndarray:
        s, q = self._stages(member_outputs)
        sick_classes = np.array([c for c in range(len(self.tasks.class_names))
                                 if c != self.tasks.healthy])
        return np.where(s >= self.threshold_, sick_classes[q.argmax(axis=1)], self.tasks.healthy)


# ---------------------------------------------------------------------------- single/vote

class SingleCombiner:
    """The one K-class member's probabilities, unchanged (so every strategy has a combiner)."""

    def __init__(self, tasks: Tasks):
        _check_strategy(tasks, "single")
        self.tasks = tasks

    def fit(self, member_outputs=None, y=None) -> SingleCombiner:
        return self

    def predict_proba(self, member_outputs) -> np.ndarray:
        return as_member_list(member_outputs, 1)[0]

    def predict(self, member_outputs) -> np.ndarray:
        return self.predict_proba(member_outputs).argmax(axis=1)


def soft_vote(probas: Sequence[np.ndarray], weights: Sequence[float] | None = None) -> np.ndarray:
    """Weighted mean of several models' K-class probabilities [N, K] (equal weights default)."""
    stack = np.stack([np.asarray(p, dtype=np.float64) for p in probas])
    if stack.ndim != 3:
        raise ValueError(f"soft voting needs [N, K] arrays of one shape; got {stack.shape}")
    w = np.ones(len(stack)) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (len(stack),) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"need one non-negative weight per model ({len(stack)}), got {w}")
    return np.tensordot(w / w.sum(), stack, axes=1)


def make_combiner(tasks: Tasks, **options):
    """The combiner for `tasks.strategy`; options go to its constructor."""
    kinds = {"single": SingleCombiner, "ova": OvACombiner, "ovo": OvOCombiner,
             "cascade": CascadeCombiner}
    return kinds[tasks.strategy](tasks, **options)
