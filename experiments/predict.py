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
from ensembles.bundle import Bundle, BundleError, StackBundle, load_bundle

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
                  use_meta: bool = False
                  ) -> tuple[list[Path], np.ndarray, np.ndarray, list[dict]]:
    """(decoded files, probabilities [N, K], decisions [N], skipped [{"path", "reason"}]).

    Decisions follow the combiner's rule (a cascade's stages, OvO votes), or the meta-
    classifier's argmax with `use_meta` or for a stack run."""
    kept, skipped, proba, decisions = [], [], [], []
    for start in range(0, len(files), CHUNK):
        source = []
        for f in files[start:start + CHUNK]:
            try:
                source.append({"image": decode_image(f), "label": 0})
                kept.append(f)
            except DecodeError as error:
                skipped.append({"path": str(f), "reason": str(error)})
        if source:
            p = bundle.predict(source, np.arange(len(source)), batch_size=batch_size,
                               use_meta=use_meta)
            proba.append(p.proba)
            decisions.append(p.decisions)
    if not proba:
        return kept, np.zeros((0, len(bundle.class_names))), np.zeros(0, int), skipped
    return kept, np.concatenate(proba), np.concatenate(decisions), skipped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run directory (ensemble, stack or single)")
    parser.add_argument("inputs", nargs="+", help="image files and/or folders")
    parser.add_argument("--csv", default=None, help="write path,class probabilities,prediction")
    parser.add_argument("--meta", action="store_true", help="use the saved meta-classifier")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    try:
        bundle = load_bundle(args.run)
        files = find_images(args.inputs)
        kept, proba, decisions, skipped = predict_files(bundle, files, batch_size=args.batch_size,
                                             use_meta=args.meta)
    except (ValueError, FileNotFoundError, BundleError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for s in skipped:
        print(f"skipped {s['path']}: {s['reason']}", file=sys.stderr)
    names = bundle.class_names
    rows = [[str(f), *(f"{p:.6f}" for p in row), names[int(d)]]
            for f, row, d in zip(kept, proba, decisions, strict=True)]
    header = ["path", *names, "prediction"]
    if args.csv:
        with open(args.csv, "w", newline="") as fh:
            csv.writer(fh).writerows([header, *rows])
    else:
        csv.writer(sys.stdout).writerows([header, *rows])
    print(f"predicted {len(kept)} image(s), skipped {len(skipped)} unreadable", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
