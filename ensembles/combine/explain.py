"""Why each decision was made: per-image columns beside the probabilities.

A rule's decision is not always the class with the highest listed probability: OvO votes
decide by majority (pairwise coupling gives the probabilities), and the cascade decides by
its stages (sick when stage 1's P(sick) >= its threshold, then the most likely sick type),
while its listed probabilities split the sick mass over the sick types. These columns say,
row by row, which rule decided and with which numbers, so that a reader of a predictions
table can check every decision.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ensembles.combine.combiners import CascadeCombiner, OvOCombiner, as_member_list


def _ovo_columns(combiner: OvOCombiner, members: list[np.ndarray], names: Sequence[str]
                 ) -> dict[str, np.ndarray]:
    k, n = len(names), len(members[0])
    votes = np.zeros((n, k), np.int64)
    for p, (i, j) in zip(members, combiner.pairs, strict=True):
        winner = np.where(p[:, 1] > p[:, 0], j, i)
        votes[np.arange(n), winner] += 1
    text = np.array(["; ".join(f"{names[c]} {v}" for c, v in enumerate(row)) for row in votes],
                    dtype=object)
    if combiner.decision == "coupling":
        rule = np.full(n, "highest pairwise-coupled probability", dtype=object)
    else:
        tied = (votes == votes.max(1, keepdims=True)).sum(1) > 1
        rule = np.where(tied, "most one-vs-one votes (tie broken by summed confidence)",
                        "most one-vs-one votes").astype(object)
    return {"decided_by": rule, "ovo_votes": text}


def _cascade_columns(combiner: CascadeCombiner, members: list[np.ndarray],
                     names: Sequence[str]) -> dict[str, np.ndarray]:
    s, q = members[0][:, 1], members[1]
    t = combiner.threshold_
    sick = [c for c in range(len(names)) if c != combiner.tasks.healthy]
    healthy = names[combiner.tasks.healthy]
    rule = np.array([
        f"stage 1: P(sick) {si:.3f} >= {t:.3f}, then the most likely sick type "
        f"({names[sick[int(qi.argmax())]]}, {qi.max():.3f} of the sick probability)"
        if si >= t else f"stage 1: P(sick) {si:.3f} < {t:.3f}: {healthy}"
        for si, qi in zip(s, q, strict=True)], dtype=object)
    return {"decided_by": rule, "p_sick": s, "stage1_threshold": np.full(len(s), t)}


def decision_columns(combiner, member_probs, class_names: Sequence[str], *,
                     use_meta: bool = False) -> dict[str, np.ndarray]:
    """{column: [N] values} saying how each row's decision was reached: always `decided_by`;
    OvO adds `ovo_votes`; the cascade adds `p_sick` (stage 1's raw output) and
    `stage1_threshold`."""
    n = len(member_probs[0])
    if use_meta:
        return {"decided_by": np.full(n, "meta-classifier: highest probability", dtype=object)}
    members = as_member_list(member_probs)
    if isinstance(combiner, OvOCombiner):
        return _ovo_columns(combiner, members, class_names)
    if isinstance(combiner, CascadeCombiner):
        return _cascade_columns(combiner, members, class_names)
    return {"decided_by": np.full(n, "highest probability", dtype=object)}
