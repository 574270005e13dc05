"""Evaluating a saved run on a whole dataset (cross-dataset evaluation) and writing its
report: the library behind `python -m experiments.evaluate` (whose docstring describes the
class matching, the leakage check, the quality filter and the lung masks).

    from ensembles.inference.evaluate_run import evaluate_run
    metrics = evaluate_run("runs/ova-simple_cnn-...", "image_folder", data_dir="other/",
                           out="runs/ova-simple_cnn-.../eval-image_folder")
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from data_pipeline import leakage, quality_filter
from data_pipeline.datasets import load_dataset
from ensembles.bundle import Bundle, StackBundle, load_bundle
from ensembles.config import ConfigError
from ensembles.evaluate.assess import evaluate_bundle, skipped_section
from ensembles.evaluate.operating_points import markdown as operating_points_markdown
from ensembles.inference.files import with_segmenter
from ensembles.report.gallery import gallery
from ensembles.report.write import write_report


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def matching_section(on: dict) -> str:
    """The report's "Cross-dataset matching" section from metrics["evaluated_on"]."""
    lines = [f"Model: `{on['run']}`; data: {on['dataset']} (every image is test data; "
             f"{on['examples']} of a class the model knows are evaluated"
             + (f", after the quality filter dropped {on['quality_dropped']}"
                if on["quality_dropped"] else "") + ").",
             f"- lung masks: {on['lung_masks']}",
             f"- classes the model lacks (left out of the metrics): "
             f"{', '.join(on['model_lacks']) or 'none'}",
             f"- classes the data lacks (no recall / ROC-AUC): "
             f"{', '.join(on['data_lacks']) or 'none'}",
             f"- entries skipped while building the dataset: {on['skipped_files']} (listed "
             f"below and in metrics.json, with reasons)"]
    for name, e in on["excluded_examples"].items():
        lines.append(f"- {e['count']} `{name}` images predicted as: "
                     + ", ".join(f"{k} {v}" for k, v in e["predicted_as"].items()))
    return "\n".join([*lines, "", skipped_section(on["skipped"], shown=20)])


def evaluate_run(run: str | Path | Bundle | StackBundle, dataset: str, *,
                 data_dir: str | Path | None = None, cache_dir: str | Path | None = None,
                 out: str | Path | None = None, use_meta: bool = False, batch_size: int = 32,
                 n_bootstrap: int = 1000, seed: int = 0, keep_lateral: bool = False,
                 quality_max: float | None = None, quality_drop_worst: float | None = None,
                 segmenter: str | Path | None = None, progress: bool = True,
                 log: Callable[[str], None] = _stderr) -> tuple[dict, Path]:
    """(metrics, report folder): the run (a run folder or a loaded bundle) evaluated on
    every image of `dataset`, its report (report.md, metrics.json, figures, the Grad-CAM
    gallery for a differentiable rule) written into `out` (default RUN/eval-<dataset>).
    ConfigError / DataError / OSError / BundleError, before anything is written, for bad
    arguments, data or a run that cannot be loaded."""
    if batch_size < 1 or n_bootstrap < 0:
        raise ConfigError("--batch-size must be >= 1 and --n-bootstrap >= 0")
    loaded = isinstance(run, Bundle | StackBundle)
    bundle = run if loaded else load_bundle(run)
    run_dir = bundle.run_dir if loaded else Path(run)
    if segmenter is not None:
        bundle = with_segmenter(bundle, segmenter)
    options = {"skip_lateral": False} if keep_lateral else {}
    data = load_dataset(dataset, data_dir=data_dir, cache_dir=cache_dir, progress=progress,
                        **options)
    metrics, y, proba, known = evaluate_bundle(
        bundle, data, np.arange(len(data.source)), batch_size=batch_size, use_meta=use_meta,
        seed=seed, n_bootstrap=n_bootstrap, quality_max=quality_max,
        quality_drop_worst=quality_drop_worst, segmenter_given=segmenter is not None,
        progress=progress)
    out = Path(out) if out is not None else run_dir / f"eval-{dataset}"
    out.mkdir(parents=True, exist_ok=True)
    quality = metrics["quality_filter"]
    if "kept" in quality:     # a filter was set
        log(f"quality filter: dropped {quality['count']} of "
            f"{quality['count'] + quality['kept']} images")
    sections = {"Cross-dataset matching": matching_section(metrics["evaluated_on"]),
                "Quality filter": quality_filter.section(quality, when="before evaluating"),
                "Leakage check": leakage.section(metrics["leakage"], metrics)}
    if "operating_point" in metrics:
        sections["Operating points"] = operating_points_markdown(metrics["operating_point"])
    tiles, note = ((), "")
    if isinstance(bundle, Bundle) and not use_meta:   # Grad-CAM follows the rule's decision
        tiles, note = gallery(bundle, data.source, known.indices, y, known.decisions, proba)
    write_report(metrics, out, y_true=y, proba=proba,
                 title=f"{run_dir.name} evaluated on {dataset}",
                 extra_sections=sections, tiles=tiles, gallery_note=note)
    return metrics, out
