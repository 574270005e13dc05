"""The strategies' own combiners (OvA normalisation, OvO votes or coupling, the cascade's stage
rule) and their saved form in combiner.json."""

from __future__ import annotations

from ensembles.combine.combiners import make_combiner
from ensembles.combine.tasks import Tasks


def rule_combiner(tasks: Tasks, *, ovo_decision: str = "votes",
                  target_sensitivity: float | None = None):
    """The strategy's own combiner: OvA normalisation, OvO votes/coupling, cascade rule."""
    if tasks.strategy == "ovo":
        return make_combiner(tasks, decision=ovo_decision)
    if tasks.strategy == "cascade":
        return make_combiner(tasks, target_sensitivity=target_sensitivity)
    return make_combiner(tasks)


def combiner_to_json(combiner) -> dict:
    """The fitted state of a rule combiner (everything needed to rebuild it with its tasks)."""
    doc = {"strategy": combiner.tasks.strategy}
    if doc["strategy"] == "ovo":
        doc.update(decision=combiner.decision, confidence=combiner.confidence)
    if doc["strategy"] == "cascade":
        doc.update(threshold=float(combiner.threshold_),
                   target_sensitivity=combiner.target_sensitivity)
    return doc


def combiner_from_json(tasks: Tasks, doc: dict):
    """Rebuild a rule combiner saved by `combiner_to_json`."""
    if doc.get("strategy") != tasks.strategy:
        raise ValueError(f"combiner is for {doc.get('strategy')!r}, tasks are {tasks.strategy!r}")
    if tasks.strategy == "ovo":
        return make_combiner(tasks, decision=doc["decision"], confidence=doc["confidence"])
    if tasks.strategy == "cascade":
        combiner = make_combiner(tasks, threshold=doc["threshold"])
        combiner.target_sensitivity = doc.get("target_sensitivity")
        return combiner
    return make_combiner(tasks)
