"""A saved model on any dataset: class matching by name, metrics, and the one-line summary.

Classes are matched by canonical name: examples of a class the model does not know are left
out of the metrics (counted, and where the model put them is reported); classes the model
knows but the data lacks get no recall / ROC-AUC. The BRISQUE quality filter
(`data_pipeline.quality_filter`) can drop images first; which lung masks the model's inputs were
given is recorded (`lung_masks_note`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from data_pipeline import leakage, quality_filter
from data_pipeline.datasets import Dataset
from data_pipeline.image_source import DataError
from ensembles.bundle import Bundle, Predictions, StackBundle
from ensembles.config import ConfigError
from ensembles.evaluate.metrics import (
    chance_level,
    classes_present,
    evaluate_predictions,
    includes_chance,
)
from ensembles.evaluate.operating_points import rates


def match_classes(model_classes: Sequence[str], data_classes: Sequence[str]) -> dict:
    """Data label -> model label for shared canonical names, plus what each side lacks."""
    model_classes = list(model_classes)
    mapping = {d: model_classes.index(c) for d, c in enumerate(data_classes)
               if c in model_classes}
    return {"mapping": mapping,
            "model_lacks": [c for c in data_classes if c not in model_classes],
            "data_lacks": [c for c in model_classes if c not in data_classes]}


class Assessment(NamedTuple):
    """A bundle on a dataset: metrics, and over the examples whose class the model knows,
    their labels (the model's class order), probabilities and the Predictions rows."""

    metrics: dict
    y: np.ndarray
    proba: np.ndarray
    predictions: Predictions


def lung_masks_note(bundle: Bundle | StackBundle, data: str, *, given: bool = False) -> str:
    """Which lung masks the model's inputs get on `data` (for a stack, per component);
    `given`: the segmenter was given for this evaluation (evaluate's --segmenter)."""
    if isinstance(bundle, StackBundle):
        return "; ".join(f"{name}: {lung_masks_note(c, data, given=given)}"
                         for name, c in zip(bundle.names, bundle.components, strict=True))
    if not bundle.preprocess.lung_mask:
        return "none (the model was trained on unmasked images)"
    if bundle.segmenter is None:
        return f"the lung masks {data} ships (the model was trained on its dataset's masks)"
    seg = bundle.segmenter
    return (f"predicted by the segmenter {seg.run_dir} (sha256 {seg.digest[:12]}; "
            + ("given for this evaluation)" if given else "recorded in the bundle)"))


def evaluate_bundle(bundle: Bundle | StackBundle, dataset: Dataset, indices: np.ndarray, *,
                    batch_size: int = 32, use_meta: bool = False, seed: int = 0,
                    n_bootstrap: int = 1000, quality_max: float | None = None,
                    quality_drop_worst: float | None = None, segmenter_given: bool = False,
                    progress: bool = False) -> Assessment:
    """The Assessment of `bundle` on dataset.source[indices], over the examples whose class
    the model knows.

    `quality_max` / `quality_drop_worst` first drop images of `indices` by BRISQUE
    (`quality_filter.filter_indices`; metrics["quality_filter"] lists them). A bundle trained
    on its dataset's shipped lung masks needs a dataset with masks (ValueError otherwise: give
    it a segmenter, `Bundle.with_segmenter`); metrics["evaluated_on"]["lung_masks"] says
    which masks were used (`segmenter_given`: see `lung_masks_note`).

    metrics["leakage"] compares those examples with the bundle's training images
    (`leakage.check`) and, when some duplicate one, holds the metrics without them
    ("without_duplicates"; None when every example is a duplicate)."""
    match = match_classes(bundle.class_names, dataset.class_names)
    if not match["mapping"]:
        raise DataError(f"no class in common: model {list(bundle.class_names)}, data "
                         f"{list(dataset.class_names)}")
    if bundle.needs_shipped_masks and not dataset.has_masks:
        raise ConfigError(f"{bundle.run_dir} was trained on the lung masks its dataset ships; "
                         f"{dataset.name} ships none: give --segmenter RUN (a run of python "
                         f"-m experiments.segment) to mask its images")
    indices, quality = quality_filter.filter_indices(
        dataset, indices, quality_max=quality_max, drop_worst=quality_drop_worst,
        progress=progress)
    if not len(indices):
        raise DataError(f"the quality filter dropped every image ({quality['count']})")
    p = bundle.predict(dataset.source, indices, batch_size=batch_size, use_meta=use_meta,
                       label_names=dataset.class_names)
    known = p.labels >= 0
    source_labels = np.asarray(dataset.labels)[p.indices]
    unknown = {}
    for d, name in enumerate(dataset.class_names):
        rows = ~known & (source_labels == d)
        if rows.any():
            counts = np.bincount(p.decisions[rows], minlength=len(bundle.class_names))
            unknown[name] = {"count": int(rows.sum()),
                             "predicted_as": dict(zip(bundle.class_names, counts.tolist()))}
    if not known.any():
        raise DataError("no example of a class the model knows")
    y, ids = p.labels[known], dataset.patient_ids[p.indices[known]]
    metrics = evaluate_predictions(y, p.proba[known], bundle.class_names, patient_ids=ids,
                                   seed=seed, y_pred=p.decisions[known],
                                   n_bootstrap=n_bootstrap)
    if p.thresholds is not None:
        metrics["operating_point"] = {
            "target": bundle.operating_point, "chosen_on": "training run's validation",
            "thresholds": p.thresholds,
            "evaluated": rates(y, p.proba[known], p.thresholds, bundle.class_names,
                               patient_ids=ids, seed=seed, n_bootstrap=n_bootstrap)}
    entry, seen = leakage.check_dataset(bundle.training_hashes(), dataset, p.indices[known],
                                        progress=progress)
    if seen.any():
        keep = ~seen
        entry["without_duplicates"] = evaluate_predictions(
            y[keep], p.proba[known][keep], bundle.class_names, patient_ids=ids[keep],
            seed=seed, y_pred=p.decisions[known][keep],
            n_bootstrap=n_bootstrap) if keep.any() else None
    metrics["leakage"] = entry
    metrics["quality_filter"] = quality
    metrics["evaluated_on"] = {"dataset": dataset.name, "run": str(bundle.run_dir),
                               "examples": int(known.sum()),
                               "quality_dropped": quality["count"],
                               "lung_masks": lung_masks_note(bundle, dataset.name,
                                                             given=segmenter_given),
                               "model_lacks": match["model_lacks"],
                               "data_lacks": match["data_lacks"],
                               "excluded_examples": unknown,
                               "skipped_files": len(dataset.skipped),
                               "skipped": list(dataset.skipped)}
    rows = np.flatnonzero(known)
    return Assessment(metrics, y, p.proba[known], dataclasses.replace(
        p, proba=p.proba[rows], decisions=p.decisions[rows], labels=p.labels[rows],
        indices=p.indices[rows], explanation={k: v[rows] for k, v in p.explanation.items()},
        flags=None if p.flags is None else p.flags[rows]))


def summary_line(metrics: dict, report: str | Path) -> str:
    """test accuracy and macro-F1 with 95% CIs, chance level for the classes present in the
    evaluated labels, the leakage check's duplicates (when metrics has one), report path."""
    def value(name: str) -> str:
        ci = (metrics.get("ci95") or {}).get(name)
        return f"{metrics[name]:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
    k = classes_present(metrics)
    verdict = " AT CHANCE: the macro-F1 CI includes chance;" if includes_chance(metrics) else ""
    leaked = leakage.summary(metrics["leakage"]) if "leakage" in metrics else ""
    return (f"test accuracy {value('accuracy')}, macro-F1 {value('macro_f1')} (95% CI); "
            f"chance {chance_level(k):.3f} for {k} classes present;{verdict}"
            f"{f' {leaked};' if leaked else ''} report: {report}")


def skipped_section(skipped: list[dict], shown: int = 50) -> str:
    """Markdown listing the entries under the data root that were not read, with reasons."""
    if not skipped:
        return "None: every file under the data root was read."
    lines = [f"{len(skipped)} entries under the data root were not read:"]
    lines += [f"- `{s['path']}`: {s['reason']}" for s in skipped[:shown]]
    if len(skipped) > shown:
        lines.append(f"- ... and {len(skipped) - shown} more (metrics.json lists all)")
    return "\n".join(lines)
