"""Strategy -> tasks -> members -> combiner: the steps every ensemble experiment runs.

Checks come first (a class the data lacks, a cascade without the healthy class, an OvO pair
with too few examples raise before anything trains); members then train as stacks
(`ensembles.members`), and their outputs on any images are per-member probabilities
[N, C_m] in the task order, which the combiners of `ensembles.combiners` turn into K-class
probabilities.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from backbones.training import distributed
from backbones.training.loop import pad_batch
from data_pipeline.loader import PAD
from ensembles import members as members_lib
from ensembles.combiners import make_combiner
from ensembles.tasks import Tasks, check_trainable, make_tasks

def plan(strategy: str, class_names: Sequence[str], train_labels: np.ndarray, *,
         healthy: str = "normal", min_per_class: int = 2, class_weighted: bool = True
         ) -> tuple[Tasks, list[members_lib.Stack]]:
    """Tasks of `strategy` and their stacks, after checking every member can be trained.

    `class_weighted`: each member weights its classes n / (C * count) over its own training
    examples (an OvA member sees 1 positive per K-1 negatives); else every weight is 1."""
    tasks = make_tasks(strategy, class_names, healthy=healthy)
    check_trainable(tasks, train_labels, min_per_class=min_per_class)
    weights = (tasks.class_weights(train_labels) if class_weighted else
               [np.ones(c, np.float32) for c in tasks.num_classes])
    return tasks, members_lib.plan_stacks(tasks.num_classes, tasks.table, weights)


def stacked_apply(model) -> Callable:
    """jit(vmap(apply)) over a member axis of the variables: images [B,...] -> logits [M,B,C]."""
    return jax.jit(jax.vmap(lambda v, x: model.apply(v, x, train=False), in_axes=(0, None)))


def member_logits(apply_fns: Sequence[Callable], variables: Sequence[dict],
                  stacks: Sequence[members_lib.Stack], batches: Iterable[dict]
                  ) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Per-member logits [N, C_m] in member order, plus labels and example indices.

    Each batch is {"image", "label", "index"} (an evaluation loader); stack s runs
    `apply_fns[s](variables[s], images)`. With several processes each runs its share of
    every batch (the loader's block, padded with index -1) on its own devices; the rows of
    all processes are gathered and the padding dropped, so every process returns the
    outputs one process would.
    """
    num_members = sum(s.size for s in stacks)
    out: list[list[np.ndarray]] = [[] for _ in range(num_members)]
    labels, indices, size = [], [], None
    for batch in batches:
        images = np.asarray(batch["image"])
        size = size or len(images)
        n = len(images)
        padded = jnp.asarray(pad_batch(images, size))         # one compiled shape
        for apply, v, stack in zip(apply_fns, variables, stacks, strict=True):
            logits = np.asarray(apply(v, padded))[:, :n]                     # [M_s, n, C]
            logits = distributed.gather(logits.swapaxes(0, 1)).swapaxes(0, 1)
            for i, m in enumerate(stack.members):
                out[m].append(logits[i])
        labels.append(distributed.gather(batch.get("label", np.zeros(n, np.int64))))
        indices.append(distributed.gather(batch.get("index", np.zeros(n, np.int64))))
    if not labels:
        raise ValueError("no images to predict")
    keep = np.concatenate(indices) != PAD
    return ([np.concatenate(o)[keep].astype(np.float64) for o in out],
            np.concatenate(labels)[keep], np.concatenate(indices)[keep])


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
