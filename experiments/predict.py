"""`python -m experiments.predict --run RUN_DIR IMAGES_OR_FOLDERS... [--csv OUT]`: class
probabilities per image from a saved ensemble, stack or single-model run.

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

The CSV is written whole or not at all (a temporary file renamed over --csv). Exit code 2
with `error: ...` when no input could be predicted or the run cannot be loaded.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from data_pipeline.decode import IMAGE_EXTENSIONS, DecodeError, decode_image, pixel_budget
from data_pipeline.dicom import is_dicom
from data_pipeline.hashing import Hasher
from data_pipeline.layouts import classify, is_utf8, printable
from ensembles import leakage
from ensembles.bundle import (Bundle, Predictions, StackBundle, concat_predictions,
                              load_bundle)
from experiments import common

SUFFIXES = IMAGE_EXTENSIONS
CHUNK = 256  # decoded images held at once (the models see them preprocessed) ...
CHUNK_PIXELS = 1 << 26  # ... or fewer, once they hold this many pixels (64 MB of uint8)


def _skip(path: Path, reason: str) -> dict[str, str]:
    return {"path": printable(str(path)), "reason": reason}


def find_images(paths: Sequence[str | Path]) -> tuple[list[Path], list[dict[str, str]]]:
    """(files to decode, skipped [{"path", "reason"}]): files named directly plus the image
    files under named folders (sorted); every other entry under them is a skip with its
    reason. A named path that does not exist at all raises FileNotFoundError."""
    found: list[Path] = []
    skipped: list[dict[str, str]] = []
    seen: set[tuple[int, int]] = set()
    for p in map(Path, paths):
        if not os.path.lexists(p):
            raise FileNotFoundError(f"no such file or folder: {printable(str(p))}")
        kind, reason = classify(p, hidden=False)
        if kind == "file":
            found.append(p)
        elif kind == "dir":
            found += _walk(p, skipped, seen)
        else:
            skipped.append(_skip(p, reason))
    return found, skipped


def _walk(top: Path, skipped: list[dict[str, str]], seen: set[tuple[int, int]]) -> list[Path]:
    """Image files (DICOM by content included) under `top`, sorted; symlinked folders are
    followed, each folder once."""
    found, stack = [], [top]
    while stack:
        folder = stack.pop()
        try:
            st = folder.stat()
            entries = sorted(folder.iterdir())
        except OSError as e:
            skipped.append(_skip(folder, f"cannot list folder: {e.strerror or e}"))
            continue
        if (st.st_dev, st.st_ino) in seen:
            skipped.append(_skip(folder, "folder already read (a symlink loop or a second "
                                         "link to it)"))
            continue
        seen.add((st.st_dev, st.st_ino))
        for entry in entries:
            kind, reason = classify(entry)
            if kind == "dir":
                stack.append(entry)
            elif kind == "skip":
                skipped.append(_skip(entry, reason))
            elif entry.suffix.lower() in SUFFIXES or is_dicom(entry):
                found.append(entry)
            else:
                skipped.append(_skip(entry, f"not an image file type "
                                            f"({entry.suffix or 'no extension'})"))
    return sorted(found)


def predict_files(bundle: Bundle | StackBundle, files: Sequence[Path], *, batch_size: int = 32,
                  use_meta: bool = False, max_pixels: int | None = None,
                  skip_lateral: bool = True,
                  on_image: Callable[[np.ndarray], None] | None = None
                  ) -> tuple[list[Path], Predictions, list[dict]]:
    """(decoded files, their Predictions, skipped [{"path", "reason"}]).

    The predictions' rows follow the decoded files (`indices` index them; there are no
    labels: -1); probability columns and decisions index `class_names`, the model's classes.
    Decisions follow the combiner's rule (a cascade's stages, OvO votes), or the meta-
    classifier's argmax with `use_meta` or for a stack run. `skip_lateral`: DICOM lateral
    views are skipped (see `data_pipeline.dicom`). At most CHUNK decoded images
    (and about CHUNK_PIXELS pixels) are held at once. `on_image` sees each decoded image
    that is kept, in order."""
    kept, skipped, chunks = [], [], []
    source: list[dict] = []
    pixels = 0

    def flush():
        nonlocal source, pixels
        if source:
            chunks.append(bundle.predict(source, np.arange(len(source)), batch_size=batch_size,
                                         use_meta=use_meta))
        source, pixels = [], 0

    for f in files:
        if not is_utf8(str(f)):
            skipped.append(_skip(f, "name is not valid UTF-8 (rename it)"))
            continue
        try:
            image = decode_image(f, max_pixels=max_pixels, skip_lateral=skip_lateral)
        except DecodeError as error:
            skipped.append(_skip(f, str(error)))
            continue
        source.append({"image": image, "label": 0})
        kept.append(f)
        if on_image is not None:
            on_image(image)
        pixels += image.size
        if len(source) >= CHUNK or pixels >= CHUNK_PIXELS:
            flush()
    flush()
    if not chunks:
        k = len(bundle.class_names)
        return kept, Predictions(tuple(bundle.class_names), np.zeros((0, k)), np.zeros(0, int),
                                 np.zeros(0, int), np.zeros(0, int)), skipped
    merged = concat_predictions(chunks)
    return kept, dataclasses.replace(merged, decisions=merged.decisions.astype(int),
                                     labels=np.full(len(kept), -1),
                                     indices=np.arange(len(kept))), skipped


def _cell(value) -> str:
    return f"{value:.6f}" if isinstance(value, float | np.floating) else str(value)


def rows(files: Sequence[Path], p: Predictions, operating_point: str | None = None
         ) -> list[list[str]]:
    """The CSV: `path`, one probability column per class, `prediction`, then the columns
    that explain it (`decided_by`; OvO `ovo_votes`; cascade `p_sick`, `stage1_threshold`)
    and, when the bundle has an operating point, `operating_point`, one `threshold_<class>`
    per class and `flagged` (the classes whose probability reaches their threshold, `;`-
    separated)."""
    names = list(p.class_names)
    header = ["path", *names, "prediction", *p.explanation]
    if p.thresholds is not None:
        header += ["operating_point", *(f"threshold_{c}" for c in names), "flagged"]
    table = [header]
    for r, f in enumerate(files):
        row = [str(f), *(f"{q:.6f}" for q in p.proba[r]), names[int(p.decisions[r])],
               *(_cell(col[r]) for col in p.explanation.values())]
        if p.thresholds is not None:
            row += [operating_point or "", *("" if t is None else f"{t:.6f}"
                                             for t in p.thresholds),
                    ";".join(c for c, hit in zip(names, p.flags[r], strict=True) if hit)]
        table.append(row)
    return table


def write_csv_atomic(path: Path, table: Sequence[Sequence[str]]) -> None:
    """Write `table` to `path` through a temporary file in its folder renamed over it: the
    file is either the whole table or what it was before, never a part."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as fh:
            csv.writer(fh).writerows(table)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _check_csv_target(path: Path) -> None:
    if path.is_dir():
        raise ValueError(f"--csv {path} is a folder")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"--csv: folder {path.parent} does not exist")


def _duplicates_note(column: Sequence[str]) -> str:
    if column and column[0] == "unknown":
        return f"duplicates of training images not checked: {leakage.NO_HASHES}"
    exact = column.count("exact")
    near = sum(v.startswith("near") for v in column)
    return f"duplicates of training images: {exact} exact, {near} near"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run directory (ensemble, stack or single)")
    parser.add_argument("inputs", nargs="+", help="image files and/or folders")
    parser.add_argument("--csv", default=None, help="write path,class probabilities,prediction")
    parser.add_argument("--meta", action="store_true", help="use the saved meta-classifier")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-pixels", type=int, default=None,
                        help="skip images with more pixels, read from the header before "
                             "decoding (default: $CXR_ENSEMBLES_MAX_PIXELS, else 50000000)")
    parser.add_argument("--keep-lateral", action="store_true",
                        help="also predict DICOM lateral views (ViewPosition LL/RL/...), "
                             "which are skipped by default: the models see frontal views")
    args = parser.parse_args(argv)
    out = Path(args.csv) if args.csv else None
    try:
        if args.batch_size < 1:
            raise ValueError("--batch-size must be >= 1")
        max_pixels = pixel_budget(args.max_pixels)
        if out is not None:
            _check_csv_target(out)
        bundle = load_bundle(args.run)
        files, skipped = find_images(args.inputs)
        hasher = Hasher()
        kept, predictions, unread = predict_files(bundle, files, batch_size=args.batch_size,
                                                  use_meta=args.meta, max_pixels=max_pixels,
                                                  skip_lateral=not args.keep_lateral,
                                                  on_image=hasher.add)
        skipped += unread
        for s in skipped:
            print(f"skipped {s['path']}: {s['reason']}", file=sys.stderr)
        if not kept:
            raise ValueError(f"nothing to predict: no readable image among the inputs "
                             f"({len(skipped)} skipped)")
        duplicates = leakage.column(bundle.training_hashes(),
                                    hasher.result([str(f) for f in kept]))
        table = [[*row, d] for row, d in zip(
            rows(kept, predictions, getattr(bundle, "operating_point", None)),
            ["duplicate_of_training", *duplicates], strict=True)]
        if out is not None:
            write_csv_atomic(out, table)
        else:
            buffer = io.StringIO()
            csv.writer(buffer).writerows(table)
            sys.stdout.write(buffer.getvalue())
    except (*common.CLI_ERRORS, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    n = len(skipped)
    print(f"predicted {len(kept)} image(s), skipped {n} unreadable or non-image "
          f"entr{'y' if n == 1 else 'ies'}; {_duplicates_note(duplicates)}"
          + (f"; csv: {out}" if out else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
