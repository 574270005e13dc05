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

The work is done by `ensembles.inference.evaluate_run.evaluate_run`; this module turns flags
into its arguments and prints one summary line.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from data_pipeline.datasets import DATASETS
from ensembles.evaluate.assess import summary_line
from ensembles.inference.evaluate_run import evaluate_run
from experiments import common


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
        metrics, out = evaluate_run(
            args.run, args.dataset, data_dir=args.data_dir, cache_dir=args.cache_dir,
            out=args.out, use_meta=args.meta, batch_size=args.batch_size,
            n_bootstrap=args.n_bootstrap, seed=args.seed, keep_lateral=args.keep_lateral,
            quality_max=args.quality_max, quality_drop_worst=args.quality_drop_worst,
            segmenter=args.segmenter, progress=args.progress)
    except Exception as error:   # noqa: BLE001 (fail re-raises what is not the user's)
        return common.fail(error, argv)
    print(summary_line(metrics, out / "report.html"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
