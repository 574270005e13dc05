"""Member groups: the members of a strategy that train as one vmapped model (same class count,
consecutive in the plan), and the checked plan of a strategy's tasks and groups."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ensembles.combine.tasks import Tasks, check_trainable, make_tasks


@dataclass(frozen=True)
class MemberGroup:
    """Members that train as one vmapped model: same class count, consecutive in the plan."""

    members: tuple[int, ...]      # indices into the strategy's member list
    num_classes: int
    table: np.ndarray             # int32 [M_s, K]: member label per original class, -1 = masked
    class_weight: np.ndarray      # float32 [M_s, num_classes]

    @property
    def size(self) -> int:
        return len(self.members)


def plan_groups(num_classes: Sequence[int], table: np.ndarray, class_weight: Sequence[np.ndarray]
                ) -> list[MemberGroup]:
    """Group members by class count, keeping member order within a group.

    `class_weight[m]` has `num_classes[m]` entries; the result is one MemberGroup per distinct count,
    in order of first appearance.
    """
    table = np.asarray(table, np.int32)
    if table.ndim != 2 or table.shape[0] != len(num_classes):
        raise ValueError(f"relabel table must be [members={len(num_classes)}, K]; "
                         f"got {table.shape}")
    groups = []
    for c in dict.fromkeys(num_classes):
        idx = tuple(m for m, n in enumerate(num_classes) if n == c)
        weights = np.stack([np.asarray(class_weight[m], np.float32) for m in idx])
        if weights.shape != (len(idx), c):
            raise ValueError(f"class weights of members {idx} must be [{len(idx)}, {c}]; "
                             f"got {weights.shape}")
        groups.append(MemberGroup(idx, int(c), table[list(idx)], weights))
    return groups


def plan(strategy: str, class_names: Sequence[str], train_labels: np.ndarray, *,
         healthy: str = "normal", min_per_class: int = 2, class_weighted: bool = True
         ) -> tuple[Tasks, list[MemberGroup]]:
    """Tasks of `strategy` and their member groups, after checking every member can be trained.

    `class_weighted`: each member weights its classes n / (C * count) over its own training
    examples (an OvA member sees 1 positive per K-1 negatives); else every weight is 1."""
    tasks = make_tasks(strategy, class_names, healthy=healthy)
    check_trainable(tasks, train_labels, min_per_class=min_per_class)
    weights = (tasks.class_weights(train_labels) if class_weighted else
               [np.ones(c, np.float32) for c in tasks.num_classes])
    return tasks, plan_groups(tasks.num_classes, tasks.table, weights)
