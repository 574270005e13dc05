"""`python -m experiments.predict --run RUN_DIR IMAGES_OR_FOLDERS... [--csv OUT]
[--gradcam DIR]`: class probabilities per image from a saved ensemble, stack or single-model
run.

Folders are searched recursively (symlinked folders followed, each folder once) for
.png/.jpg/.jpeg/.bmp/.tif/.tiff/.dcm/.dicom files and for DICOM files named otherwise
(recognised by their preamble); files named directly are decoded whatever their extension.
Every other entry met (another file type, a hidden entry, a symlink loop, a dangling
symlink, a name that is not UTF-8, a FIFO) and every file that cannot be decoded or is over
the pixel budget (--max-pixels) is reported on stderr with its reason and counted, and so is
every DICOM file refused by `data_pipeline.dicom` (a lateral view unless --keep-lateral, a
colour or multi-frame image, an object without pixel data).
The rest are preprocessed exactly as in training (the bundle's PreprocessConfig; each
component's own for a stack run, which decides by its meta-classifier).

Each image is hashed and compared with the hashes of the images the model was trained and
validated on (stored in the run): the CSV's last column, duplicate_of_training, says
"exact" (same pixels), "near:<bits>" (a resized or re-encoded copy) or nothing, and the
summary on stderr counts them ("unknown" for a run saved without training hashes).

--gradcam DIR writes one Grad-CAM overlay PNG per predicted image into DIR (created if
missing): the map of the ensemble's decision over the image as the model saw it, with the
class and its probability in the corner (ensembles.report.overlay; not for stack runs or --meta,
whose meta-classifier is not differentiable). Each PNG is named after its input's stem (plus
a hash of its path where stems repeat) and written whole or not at all.

--quality-max SCORE scores every decoded image by BRISQUE (`data_pipeline.quality`; not
computed without the flag, it costs time): the CSV (and --report's table) gains a `brisque`
column, and images above SCORE are skipped with the reason "quality: BRISQUE X > SCORE" and
counted in the summary.

Lung masks: a run trained with --lung-mask auto masks every image with its recorded
segmenter. Decoded files ship no masks, so a run trained on a dataset's masks needs
--segmenter RUN (a run of python -m experiments.segment), whose predicted masks it then uses
(--segmenter also replaces an auto run's segmenter; it is refused for a run trained on
unmasked images). The summary and --report say which masks were used.

The CSV is written whole or not at all (a temporary file renamed over --csv). Exit code 2
with `error: ...` when no input could be predicted or the run cannot be loaded.

The work is done by `ensembles.inference.files.predict_files`; this module turns flags into
its arguments and prints the table (without --csv) and one summary line.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from collections.abc import Sequence
from pathlib import Path

from ensembles.inference import files as library
from experiments import common


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run directory (ensemble, stack or single)")
    parser.add_argument("inputs", nargs="+", help="image files and/or folders")
    parser.add_argument("--csv", default=None, help="write path,class probabilities,prediction")
    parser.add_argument("--meta", action="store_true", help="use the saved meta-classifier")
    parser.add_argument("--gradcam", default=None, metavar="DIR",
                        help="write a Grad-CAM overlay PNG per image into DIR")
    parser.add_argument("--report", default=None, metavar="FILE",
                        help="write a self-contained HTML page: every prediction with its "
                             "explanation, and the Grad-CAM overlays")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-pixels", type=int, default=None,
                        help="skip images with more pixels, read from the header before "
                             "decoding (default: $CXR_ENSEMBLES_MAX_PIXELS, else 50000000)")
    parser.add_argument("--keep-lateral", action="store_true",
                        help="also predict DICOM lateral views (ViewPosition LL/RL/...), "
                             "which are skipped by default: the models see frontal views")
    parser.add_argument("--quality-max", type=float, metavar="SCORE",
                        help="score each image by BRISQUE (a `brisque` column) and skip those "
                             "above SCORE")
    parser.add_argument("--segmenter", metavar="RUN",
                        help="for a run trained on lung-masked images: mask with this "
                             "segmenter's predicted masks (python -m experiments.segment)")
    args = parser.parse_args(argv)
    try:
        result = library.predict_files(
            args.run, args.inputs, csv_path=args.csv, gradcam=args.gradcam, report=args.report,
            batch_size=args.batch_size, use_meta=args.meta, max_pixels=args.max_pixels,
            keep_lateral=args.keep_lateral, quality_max=args.quality_max,
            segmenter=args.segmenter)
        if args.csv is None:
            buffer = io.StringIO()
            csv.writer(buffer).writerows(result.table)
            sys.stdout.write(buffer.getvalue())
    except Exception as error:   # noqa: BLE001 (fail re-raises what is not the user's)
        return common.fail(error, argv)
    print(result.summary(args.csv and Path(args.csv), args.gradcam and Path(args.gradcam)),
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
