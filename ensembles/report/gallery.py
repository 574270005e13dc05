"""The report's gallery: correctly and wrongly classified test images with Grad-CAM overlays.

Which images: up to `per_group` wrong and `per_group` right decisions, taken in turn from each
true class so that every class shows, the most confident first within a class (the most
alarming errors, the clearest successes). Each tile is the ensemble's Grad-CAM overlay
(`ensembles.report.overlay.bundle_overlays`: the map of the rule's decision over the image as the
model saw it) with the true class, the decision and its probability.
"""

from __future__ import annotations

import numpy as np

from ensembles.bundle import Bundle
from ensembles.report.html import Tile, tile_caption
from ensembles.report.overlay import bundle_overlays
from ensembles.report.saliency import METHODS

TILE_SIZE = 160      # px per gallery image
PER_GROUP = 8


def pick(y: np.ndarray, decisions: np.ndarray, proba: np.ndarray, *,
         per_group: int = PER_GROUP) -> tuple[np.ndarray, np.ndarray]:
    """(wrong rows, right rows): up to `per_group` each, round-robin over the true classes,
    the highest probability of the decided class first within each class."""
    y, decisions = np.asarray(y), np.asarray(decisions)
    confidence = np.asarray(proba)[np.arange(len(y)), decisions]
    chosen = []
    for mask in (y != decisions, y == decisions):
        queues = [list(rows[np.argsort(-confidence[rows], kind="stable")])
                  for c in np.unique(y) if len(rows := np.flatnonzero(mask & (y == c)))]
        order = []
        while queues and len(order) < per_group:
            for q in queues:
                if q and len(order) < per_group:
                    order.append(q.pop(0))
            queues = [q for q in queues if q]
        chosen.append(np.array(order, dtype=np.int64))
    return chosen[0], chosen[1]


def gallery(bundle: Bundle, source, indices: np.ndarray, y: np.ndarray, decisions: np.ndarray,
            proba: np.ndarray, *, per_group: int = PER_GROUP) -> tuple[list[Tile], str]:
    """(tiles, the note that says what they show) for the examples source[indices] (raw, as
    the loader reads them) with their labels (indices into bundle.class_names), decisions
    and probabilities; only the chosen images are read."""
    wrong, right = pick(y, decisions, proba, per_group=per_group)
    rows = np.concatenate([wrong, right])
    if not len(rows):
        return [], ""
    examples = [source[int(indices[r])] for r in rows]
    images = [np.asarray(e["image"]) for e in examples]
    _, overlays = bundle_overlays(bundle, images, size=TILE_SIZE,
                                  masks=[e.get("mask") for e in examples])
    names = bundle.class_names
    tiles = [Tile(o, tile_caption(names[y[r]], names[decisions[r]], float(proba[r, decisions[r]])),
                  bool(y[r] == decisions[r])) for r, o in zip(rows, overlays, strict=True)]
    note = (f"Grad-CAM of the ensemble's decision ({METHODS[bundle.tasks.strategy]} method, "
            f"see ensembles/report/saliency.py) over each image as the model saw it: red areas "
            f"weighed most for the decided class. Red borders: wrong decisions, the most "
            f"confident first; green: right ones. Up to {per_group} of each, taken in turn "
            f"from every true class.")
    return tiles, note
