"""`python -m experiments.evaluate --run RUN_DIR --dataset NAME --data-dir PATH [--out DIR]`:
evaluate a saved ensemble, stack or single model on another dataset (cross-dataset evaluation).

Every image of the dataset is test data. Classes are matched by canonical name: examples of
a class the model does not know are left out of the metrics (counted, and where the model
put them is reported); classes the model knows but the data lacks get no recall / ROC-AUC.
Both lists are written into the report. A stack run runs each component with its own
preprocessing and decides by the meta-classifier (--meta is implied).

Leakage check: every evaluated image is hashed and compared with the hashes of the images
the model was trained and validated on (stored in the run). The report's "Leakage check"
section lists the exact and near duplicates with the training image each copies, and gives
the metrics with and without them; so do metrics.json ("leakage") and the summary line.

--quality-max SCORE / --quality-drop-worst FRACTION drop evaluated images by BRISQUE first
(as the training CLIs drop them before splitting; the same cached scores): the count is
printed, the files are listed in the report's "Quality filter" section and metrics.json
("quality_filter"), and the metrics are computed on the images kept.

Lung masks: the bundle decides. A run trained with --lung-mask auto masks with its recorded
segmenter; one trained with the dataset's masks needs a dataset that ships them, or
--segmenter RUN (a run of python -m experiments.segment), whose predicted masks are then used
instead (for a run trained on unmasked images --segmenter is refused). The report says which
masks were used.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from data_pipeline.datasets import DATASETS, load_dataset
from data_pipeline import leakage
from data_pipeline import quality_filter
from ensembles.evaluate.assess import evaluate_bundle, skipped_section, summary_line
from ensembles.bundle import Bundle, load_bundle
from ensembles.report.write import write_report
from ensembles.report.gallery import gallery
from ensembles.evaluate.operating_points import markdown as operating_points_markdown
from ensembles.bundle.segmenter import load_segmenter
from experiments import common


def _section(on: dict) -> str:
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run directory (ensemble, stack or single)")
    parser.add_argument("--dataset", required=True, choices=DATASETS)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--out", default=None, help="report folder (default RUN/eval-<dataset>)")
    parser.add_argument("--meta", action="store_true", help="use the saved meta-classifier")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--n-bootstrap", type=int, default=1000,
                        help="patient-grouped bootstrap resamples for the 95%% CIs (0: none)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    parser.add_argument("--keep-lateral", action="store_true",
                        help="folder datasets: read DICOM lateral views too (skipped by "
                             "default: the models see frontal views)")
    parser.add_argument("--quality-max", type=float, metavar="SCORE",
                        help="drop images whose BRISQUE score is above SCORE before assessing")
    parser.add_argument("--quality-drop-worst", type=float, metavar="FRACTION",
                        help="drop this fraction of the images with the worst BRISQUE scores")
    parser.add_argument("--segmenter", metavar="RUN",
                        help="for a run trained on lung-masked images: mask with this "
                             "segmenter's predicted masks (python -m experiments.segment)")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bars")
    args = parser.parse_args(argv)
    try:
        if args.batch_size < 1 or args.n_bootstrap < 0:
            raise ValueError("--batch-size must be >= 1 and --n-bootstrap >= 0")
        bundle = load_bundle(args.run)
        if args.segmenter is not None:
            bundle = bundle.with_segmenter(load_segmenter(args.segmenter))
        options = {"skip_lateral": False} if args.keep_lateral else {}
        dataset = load_dataset(args.dataset, data_dir=args.data_dir, cache_dir=args.cache_dir,
                               progress=args.progress, **options)
        metrics, y, proba, known = evaluate_bundle(
            bundle, dataset, np.arange(len(dataset.source)), batch_size=args.batch_size,
            use_meta=args.meta, seed=args.seed, n_bootstrap=args.n_bootstrap,
            quality_max=args.quality_max, quality_drop_worst=args.quality_drop_worst,
            segmenter_given=args.segmenter is not None, progress=args.progress)
    except common.CLI_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(args.run) / f"eval-{args.dataset}"
    out.mkdir(parents=True, exist_ok=True)
    quality = metrics["quality_filter"]
    if "kept" in quality:     # a filter was set
        print(f"quality filter: dropped {quality['count']} of "
              f"{quality['count'] + quality['kept']} images", file=sys.stderr)
    sections = {"Cross-dataset matching": _section(metrics["evaluated_on"]),
                "Quality filter": quality_filter.section(quality, when="before evaluating"),
                "Leakage check": leakage.section(metrics["leakage"], metrics)}
    if "operating_point" in metrics:
        sections["Operating points"] = operating_points_markdown(metrics["operating_point"])
    tiles, note = ((), "")
    if isinstance(bundle, Bundle) and not args.meta:   # Grad-CAM follows the rule's decision
        tiles, note = gallery(bundle, dataset.source, known.indices, y, known.decisions, proba)
    write_report(metrics, out, y_true=y, proba=proba,
                 title=f"{Path(args.run).name} evaluated on {args.dataset}",
                 extra_sections=sections, tiles=tiles, gallery_note=note)
    print(summary_line(metrics, out / "report.md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
