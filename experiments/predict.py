"""`python -m experiments.predict --run RUN_DIR IMAGES_OR_FOLDER... [--csv OUT]`: class
probabilities per image from a saved ensemble, stack or single-model run.

Folders are searched recursively for .png/.jpg/.jpeg/.bmp/.tif files. Files that cannot be
decoded are reported on stderr, counted and skipped; the rest are preprocessed exactly as in
training (the bundle's PreprocessConfig; each component's own for a stack run, which decides
by its meta-classifier).
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from data_pipeline.decode import DecodeError, decode_image
from ensembles.bundle import Bundle, Predictions, StackBundle, load_bundle
from experiments import common

SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
CHUNK = 256  # decoded full-size images held at once (the models see them preprocessed)


def find_images(paths: Sequence[str | Path]) -> list[Path]:
    """Files named directly plus image files under named folders (sorted); missing -> error."""
    found = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SUFFIXES)
        elif p.is_file():
            found.append(p)
        else:
            raise FileNotFoundError(f"no such file or folder: {p}")
    return found


def predict_files(bundle: Bundle | StackBundle, files: Sequence[Path], *, batch_size: int = 32,
                  use_meta: bool = False) -> tuple[list[Path], Predictions, list[dict]]:
    """(decoded files, their Predictions, skipped [{"path", "reason"}]).

    The predictions' rows follow the decoded files (`indices` index them; there are no
    labels: -1); probability columns and decisions index `class_names`, the model's classes.
    Decisions follow the combiner's rule (a cascade's stages, OvO votes), or the meta-
    classifier's argmax with `use_meta` or for a stack run."""
    kept, skipped, chunks = [], [], []
    for start in range(0, len(files), CHUNK):
        source = []
        for f in files[start:start + CHUNK]:
            try:
                source.append({"image": decode_image(f), "label": 0})
                kept.append(f)
            except DecodeError as error:
                skipped.append({"path": str(f), "reason": str(error)})
        if source:
            chunks.append(bundle.predict(source, np.arange(len(source)), batch_size=batch_size,
                                         use_meta=use_meta))
    k = len(bundle.class_names)
    class_names = chunks[0].class_names if chunks else tuple(bundle.class_names)
    proba = np.concatenate([c.proba for c in chunks]) if chunks else np.zeros((0, k))
    decisions = (np.concatenate([c.decisions for c in chunks]).astype(int) if chunks
                 else np.zeros(0, int))
    return kept, Predictions(class_names, proba, decisions, np.full(len(kept), -1),
                             np.arange(len(kept))), skipped


def rows(files: Sequence[Path], p: Predictions) -> list[list[str]]:
    """The CSV: a header `path,<class names...>,prediction`, then one row per file with its
    probabilities and the name of its decided class."""
    names = list(p.class_names)
    return [["path", *names, "prediction"],
            *([str(f), *(f"{q:.6f}" for q in row), names[int(d)]]
              for f, row, d in zip(files, p.proba, p.decisions, strict=True))]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run directory (ensemble, stack or single)")
    parser.add_argument("inputs", nargs="+", help="image files and/or folders")
    parser.add_argument("--csv", default=None, help="write path,class probabilities,prediction")
    parser.add_argument("--meta", action="store_true", help="use the saved meta-classifier")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    try:
        if args.batch_size < 1:
            raise ValueError("--batch-size must be >= 1")
        bundle = load_bundle(args.run)
        files = find_images(args.inputs)
        kept, predictions, skipped = predict_files(bundle, files, batch_size=args.batch_size,
                                                   use_meta=args.meta)
    except common.CLI_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for s in skipped:
        print(f"skipped {s['path']}: {s['reason']}", file=sys.stderr)
    table = rows(kept, predictions)
    if args.csv:
        with open(args.csv, "w", newline="") as fh:
            csv.writer(fh).writerows(table)
    else:
        csv.writer(sys.stdout).writerows(table)
    print(f"predicted {len(kept)} image(s), skipped {len(skipped)} unreadable"
          + (f"; csv: {args.csv}" if args.csv else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
