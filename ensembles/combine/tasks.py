"""Member tasks of an ensemble strategy, as relabelling tables over the original K classes.

A strategy decomposes a K-class problem into M member problems. Member m's label for an
example of original class y is `table[m, y]` (-1: the member does not train on that class), so
labels and masks for a batch are `table[:, y]` and `table[:, y] >= 0`, computable on device.

- "single":  one K-class member.
- "ova":     K binary members, member k: label 1 = class k, 0 = every other class.
- "ovo":     K(K-1)/2 binary members over the pairs i < j in scikit-learn's order
             (0,1), (0,2), ..., (1,2), ...; label 0 = class i, 1 = class j, others masked,
             as in sklearn.multiclass.OneVsOneClassifier.
- "cascade": member 0 healthy (0) vs sick (1); member 1 a (K-1)-class model over the sick
             classes, in their original order, trained on sick examples only.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import jax
import jax.numpy as jnp
import numpy as np

from data_pipeline.balance import class_weights as balanced_weights
from data_pipeline.classes import NORMAL
from ensembles.config import STRATEGIES, ConfigError


def relabel(table, labels):
    """Each member's label [M, N] of original labels: `table[:, y]` (-1 = not this member's
    example). `labels` [N] is one batch every member sees; [N, M] gives member m its own
    column m (`MemberBatches`). NumPy in, NumPy out; jax arrays in (also under jit), jax
    arrays out: the one relabelling of training, its targets, its own examples and its
    validation metrics, the tasks' member labels and the OvO maps of Grad-CAM."""
    xp = jnp if isinstance(table, jax.Array) or isinstance(labels, jax.Array) else np
    table = xp.asarray(table)
    if labels.ndim == 2:
        return xp.take_along_axis(table, xp.asarray(labels).T, axis=1)
    return table[:, labels]


@dataclass(frozen=True)
class Tasks:
    """The member problems of one strategy over `class_names`."""

    strategy: str
    class_names: tuple[str, ...]
    names: tuple[str, ...]          # one per member
    num_classes: tuple[int, ...]    # output classes per member
    table: np.ndarray               # int32 [M, K]: member label per original class, -1 = masked
    healthy: int | None = None      # index of the healthy class (cascade only)

    @property
    def num_members(self) -> int:
        return len(self.names)

    def member_labels(self, labels) -> tuple[np.ndarray, np.ndarray]:
        """Member labels [M, N] (masked entries set to 0) and masks [M, N] for original labels."""
        y = _check_labels(labels, len(self.class_names))
        member = relabel(self.table, y)
        mask = member >= 0
        return np.where(mask, member, 0), mask

    def class_weights(self, labels) -> list[np.ndarray]:
        """Per member, balanced class weights n_m / (C_m * count) over its own training examples.

        `labels` are the original training labels; raises ValueError (via data_pipeline.balance)
        if a member class has no example: call `check_trainable` first for a clearer message.
        """
        member, mask = self.member_labels(labels)
        return [balanced_weights(member[m][mask[m]], self.num_classes[m])
                for m in range(self.num_members)]

    def groups(self, member: int) -> list[np.ndarray]:
        """For each output column of `member`, the original classes it stands for."""
        return [np.flatnonzero(self.table[member] == c) for c in range(self.num_classes[member])]


def _check_labels(labels, k: int) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got {y.dtype} {y.shape}")
    if len(y) and (y.min() < 0 or y.max() >= k):
        raise ValueError(f"labels must lie in [0, {k}); got range [{y.min()}, {y.max()}]")
    return y


def make_tasks(strategy: str, class_names, *, healthy: str = NORMAL) -> Tasks:
    """The member tasks of `strategy` ("single", "ova", "ovo", "cascade") over `class_names`."""
    names = tuple(str(c) for c in class_names)
    k = len(names)
    if k < 2:
        raise ValueError(f"need at least 2 classes, got {list(names)}")
    if len(set(names)) != k:
        raise ValueError(f"duplicate class names: {list(names)}")
    if strategy == "single":
        return Tasks(strategy, names, ("all",), (k,), np.arange(k, dtype=np.int32)[None])
    if strategy == "ova":
        table = np.eye(k, dtype=np.int32)
        return Tasks(strategy, names, tuple(f"{c}_vs_rest" for c in names), (2,) * k, table)
    if strategy == "ovo":
        pairs = list(combinations(range(k), 2))
        table = np.full((len(pairs), k), -1, dtype=np.int32)
        for m, (i, j) in enumerate(pairs):
            table[m, i], table[m, j] = 0, 1
        return Tasks(strategy, names, tuple(f"{names[i]}_vs_{names[j]}" for i, j in pairs),
                     (2,) * len(pairs), table)
    if strategy == "cascade":
        if healthy not in names:
            raise ConfigError(f"cascade needs the healthy class {healthy!r}; "
                             f"classes are {list(names)}")
        if k < 3:
            raise ConfigError(f"cascade needs at least 2 sick classes besides {healthy!r}; "
                             f"classes are {list(names)}")
        h = names.index(healthy)
        stage1 = np.ones(k, dtype=np.int32)
        stage1[h] = 0
        stage2 = np.full(k, -1, dtype=np.int32)
        stage2[[c for c in range(k) if c != h]] = np.arange(k - 1)
        return Tasks(strategy, names, ("healthy_vs_sick", "sick_type"), (2, k - 1),
                     np.stack([stage1, stage2]), healthy=h)
    raise ValueError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")


def check_trainable(tasks: Tasks, labels, *, min_per_class: int = 1) -> dict[str, list[int]]:
    """Raise ValueError unless every member has >= `min_per_class` training examples per class.

    Returns {member name: examples per member class} for logging. The error names the member,
    the class(es) short of examples and the counts (a class missing from the data, or an OvO
    pair too small to learn).
    """
    member, mask = tasks.member_labels(labels)
    counts, short = {}, []
    for m, name in enumerate(tasks.names):
        c = np.bincount(member[m][mask[m]], minlength=tasks.num_classes[m])
        counts[name] = c.tolist()
        for col, n in enumerate(c):
            if n < min_per_class:
                classes = "+".join(tasks.class_names[i] for i in tasks.groups(m)[col])
                short.append(f"{name}: {classes} has {n}")
    if short:
        raise ConfigError(f"{tasks.strategy} members need >= {min_per_class} training examples per "
                         f"class; " + "; ".join(short))
    return counts
