"""Did the model see these images in training? The leakage check of `evaluate` and `predict`.

At the end of training, `save_training_hashes` writes RUN/train_hashes.npz: the content and
perceptual hashes (data_pipeline.hashing) of every image of the train and validation splits
(validation images chose the epochs and fitted the combiner, so they count as seen), with
their paths and split. It is an optional bundle piece, listed in the manifest; a run from
before it loads as before and its check says NO_HASHES.

`check` compares evaluated images with those hashes: exact duplicates (same pixels) and near
ones (resized / re-encoded copies, `hashing.MAX_DISTANCE`). `ensembles.evaluate.assess.evaluate_bundle`
adds its result, with the metrics without the duplicates, to metrics.json as "leakage";
`section` and `summary` render it for the report and the CLI's summary line.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from data_pipeline.hashing import (
    MAX_DISTANCE,
    WORDS,
    ImageHashes,
    find_duplicates,
    hash_dataset,
)

TRAIN_HASHES_FILE = "train_hashes.npz"
NO_HASHES = "no training hashes in this bundle (trained before the leakage check existed)"


@dataclasses.dataclass(frozen=True)
class TrainingHashes:
    """The hashes of the images a model was fitted on."""

    hashes: ImageHashes
    splits: np.ndarray    # str [N]: "train" or "val"
    dataset: str          # the dataset's name (names joined by ", " for a stack)


def save_training_hashes(run_dir: str | Path, dataset, splits: Mapping[str, np.ndarray],
                         *, progress: bool = True) -> str:
    """Hash dataset.source at each split's indices (hash_dataset: cached per build), write
    run_dir/TRAIN_HASHES_FILE and return its name (the bundle section's "train_hashes")."""
    rows = {name: np.unique(np.asarray(idx, np.int64)) for name, idx in splits.items()}
    order = np.concatenate(list(rows.values()))
    hashes = hash_dataset(dataset, order, progress=progress)
    names = np.concatenate([np.full(len(idx), name) for name, idx in rows.items()])
    np.savez(Path(run_dir) / TRAIN_HASHES_FILE, content=hashes.content,
             perceptual=hashes.perceptual, path=hashes.paths, split=names.astype(str),
             dataset=np.asarray(dataset.name))
    return TRAIN_HASHES_FILE


def load_training_hashes(path: str | Path) -> TrainingHashes:
    """Read a TRAIN_HASHES_FILE; ValueError (one line) if it is not one."""
    try:
        with np.load(path, allow_pickle=False) as f:
            content, perceptual = f["content"], f["perceptual"]
            paths, splits, dataset = f["path"], f["split"], f["dataset"]
    except (OSError, KeyError, ValueError) as error:
        raise ValueError(f"{path}: not a training-hashes file ({error})") from None
    n = len(content)
    if (content.dtype.kind != "U" or perceptual.dtype != np.uint64
            or perceptual.shape != (n, WORDS) or paths.shape != (n,) or splits.shape != (n,)
            or dataset.shape != ()):
        raise ValueError(f"{path}: the training-hashes arrays have the wrong types or shapes")
    return TrainingHashes(ImageHashes(content, perceptual, paths.astype(str)),
                          splits.astype(str), str(dataset))


def concatenate(parts: Sequence[TrainingHashes]) -> TrainingHashes:
    """One TrainingHashes for several models' (a stack's components)."""
    return TrainingHashes(
        ImageHashes(*(np.concatenate([getattr(p.hashes, f) for p in parts])
                      for f in ("content", "perceptual", "paths"))),
        np.concatenate([p.splits for p in parts]),
        ", ".join(dict.fromkeys(p.dataset for p in parts)))


def check(training: TrainingHashes, evaluated: ImageHashes, *,
          max_distance: int = MAX_DISTANCE) -> tuple[dict, np.ndarray]:
    """(the "leakage" entry, bool [N] marking the evaluated images that duplicate a training
    image)."""
    marked = np.zeros(len(evaluated), bool)
    m = find_duplicates(evaluated, training.hashes, max_distance=max_distance)
    marked[m.query] = True
    listed = [{"path": str(evaluated.paths[q]), "kind": "exact" if e else "near",
               "distance": int(d), "training_path": str(training.hashes.paths[r]),
               "training_split": str(training.splits[r])}
              for q, r, d, e in zip(m.query, m.reference, m.distance, m.exact, strict=True)]
    return {"checked": True, "training_dataset": training.dataset,
            "training_images": len(training.hashes), "max_distance": max_distance,
            "evaluated": len(evaluated), "exact": int(m.exact.sum()),
            "near": int((~m.exact).sum()), "duplicates": listed}, marked


def check_dataset(training: TrainingHashes | None, dataset, indices: np.ndarray, *,
                  max_distance: int = MAX_DISTANCE, progress: bool = True
                  ) -> tuple[dict, np.ndarray]:
    """`check` on dataset.source[indices] (hashed once per build, with a bar unless
    `progress` is False); without training hashes {"checked": False, "reason": NO_HASHES} and
    nothing marked (nor hashed)."""
    if training is None:
        return {"checked": False, "reason": NO_HASHES}, np.zeros(len(indices), bool)
    return check(training, hash_dataset(dataset, indices, progress=progress),
                 max_distance=max_distance)


def column(training: TrainingHashes | None, evaluated: ImageHashes, *,
           max_distance: int = MAX_DISTANCE) -> list[str]:
    """Per evaluated image: "exact", "near:<distance>" or "" (no duplicate); "unknown" for
    every image when there are no training hashes."""
    if training is None:
        return ["unknown"] * len(evaluated)
    values = [""] * len(evaluated)
    m = find_duplicates(evaluated, training.hashes, max_distance=max_distance)
    for q, kind in zip(m.query, m.kinds(), strict=True):
        values[q] = kind
    return values


def summary(entry: Mapping) -> str:
    """A clause for the CLI's summary line: the duplicates and the metrics without them
    ("" when checked and none found)."""
    if not entry.get("checked"):
        return f"leakage not checked: {entry.get('reason', NO_HASHES)}"
    if not entry["duplicates"]:
        return ""
    text = (f"LEAKAGE: {entry['exact']} exact and {entry['near']} near duplicate(s) of "
            f"training images among {entry['evaluated']} evaluated")
    without = entry.get("without_duplicates")
    if without:
        text += (f"; without them: accuracy {without['accuracy']:.3f}, macro-F1 "
                 f"{without['macro_f1']:.3f} ({without['n_examples']} images)")
    return text


def section(entry: Mapping, metrics: Mapping, shown: int = 50) -> str:
    """The report's "Leakage check" section (markdown)."""
    if not entry.get("checked"):
        return f"Not checked: {entry.get('reason', NO_HASHES)}."
    lines = [f"The bundle holds the hashes of {entry['training_images']} training and "
             f"validation images ({entry['training_dataset']}). Of {entry['evaluated']} "
             f"evaluated images, **{entry['exact']} are exact duplicates** (same pixels) and "
             f"**{entry['near']} near duplicates** (perceptual hash within "
             f"{entry['max_distance']} of 256 bits: resized or re-encoded copies) of them.", ""]
    if not entry["duplicates"]:
        return lines[0] + " The metrics above are on unseen images."
    lines += ["| images | n | accuracy | macro-F1 |", "|---|---|---|---|",
              _row("all evaluated", metrics)]
    without = entry.get("without_duplicates")
    lines.append(_row("without the duplicates", without) if without else
                 "| without the duplicates | 0 | - | - |")
    lines += ["", "| evaluated image | duplicate | training image (split) |", "|---|---|---|"]
    for d in entry["duplicates"][:shown]:
        kind = "exact" if d["kind"] == "exact" else f"near ({d['distance']} bits)"
        lines.append(f"| `{d['path']}` | {kind} | `{d['training_path']}` "
                     f"({d['training_split']}) |")
    if len(entry["duplicates"]) > shown:
        lines.append(f"| ... and {len(entry['duplicates']) - shown} more (metrics.json lists "
                     f"all) | | |")
    return "\n".join(lines)


def _row(name: str, m: Mapping) -> str:
    ci = m.get("ci95") or {}

    def value(key: str) -> str:
        bounds = ci.get(key)
        return f"{m[key]:.3f}" + (f" [{bounds[0]:.3f}, {bounds[1]:.3f}]" if bounds else "")
    return f"| {name} | {m['n_examples']} | {value('accuracy')} | {value('macro_f1')} |"
