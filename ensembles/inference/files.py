"""Predicting image files and folders with a saved run: discovery, counted and reported skips,
prediction through the loaded bundle, the CSV table, Grad-CAM overlays and the HTML page.

    from ensembles.inference.files import predict_files
    result = predict_files("runs/ova-simple_cnn-...", ["scans/"], csv_path="pred.csv",
                           gradcam="overlays/")
    result.table        # the CSV's rows (header first), result.skipped: [{"path", "reason"}]

Folders are searched recursively (symlinked folders followed, each folder once) for image
files and for DICOM files named otherwise (recognised by their preamble); files named directly
are decoded whatever their extension. Every other entry met and every file that cannot be
decoded, is over the pixel budget, is refused by `data_pipeline.dicom` or by the quality gate
is a skip with its reason, counted and reported. `python -m experiments.predict` is this
module's CLI (its docstring describes the columns and files).
"""

from __future__ import annotations

import csv
import dataclasses
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from data_pipeline import leakage
from data_pipeline.atomic import atomic_write
from data_pipeline.decode import (
    IMAGE_EXTENSIONS,
    DecodeError,
    decode_image,
    pixel_budget,
)
from data_pipeline.dicom import is_dicom
from data_pipeline.hashing import Hasher
from data_pipeline.layouts import classify, is_utf8, printable
from data_pipeline.quality_filter import QualityGate
from ensembles.bundle import (
    Bundle,
    Predictions,
    StackBundle,
    concat_predictions,
    load_bundle,
)
from ensembles.bundle.segmenter import load_segmenter
from ensembles.config import ConfigError
from ensembles.evaluate.assess import lung_masks_note
from ensembles.report.gallery import TILE_SIZE
from ensembles.report.html import Tile, tile_caption, write_predictions_page
from ensembles.report.overlay import bundle_overlays, overlay_names, write_png

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


def predict_images(bundle: Bundle | StackBundle, files: Sequence[Path], *,
                   batch_size: int = 32,
                   use_meta: bool = False, max_pixels: int | None = None,
                   skip_lateral: bool = True,
                   on_image: Callable[[np.ndarray], None] | None = None,
                   gate: Callable[[np.ndarray], str | None] | None = None,
                   on_overlay: Callable[[Path, np.ndarray], None] | None = None
                   ) -> tuple[list[Path], Predictions, list[dict]]:
    """(decoded files, their Predictions, skipped [{"path", "reason"}]).

    With `on_overlay` (a Bundle only) each decoded file's Grad-CAM overlay (uint8 RGB,
    `ensembles.report.overlay.bundle_overlays`) is passed to it with the file, in order.

    The predictions' rows follow the decoded files (`indices` index them; there are no
    labels: -1); probability columns and decisions index `class_names`, the model's classes.
    Decisions follow the combiner's rule (a cascade's stages, OvO votes), or the meta-
    classifier's argmax with `use_meta` or for a stack run. `skip_lateral`: DICOM lateral
    views are skipped (see `data_pipeline.dicom`). At most CHUNK decoded images
    (and about CHUNK_PIXELS pixels) are held at once. `on_image` sees each decoded image
    that is kept, in order. `gate` sees each decoded image first and returns None to keep
    it or the reason it is skipped (`data_pipeline.quality_filter.QualityGate`)."""
    kept, skipped, chunks = [], [], []
    source: list[dict] = []
    pixels = 0

    def flush():
        nonlocal source, pixels
        if source:
            chunks.append(bundle.predict(source, np.arange(len(source)), batch_size=batch_size,
                                         use_meta=use_meta))
            if on_overlay is not None:
                images = [s["image"] for s in source]
                _, overlays = bundle_overlays(bundle, images, batch_size=batch_size)
                for f, rgb in zip(kept[len(kept) - len(source):], overlays, strict=True):
                    on_overlay(f, rgb)
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
        if gate is not None and (reason := gate(image)) is not None:
            skipped.append(_skip(f, reason))
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
    with atomic_write(path, newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows(table)


def check_target(path: Path, flag: str = "--csv") -> None:
    if path.is_dir():
        raise ConfigError(f"{flag} {path} is a folder")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{flag}: folder {path.parent} does not exist")


def duplicates_note(column: Sequence[str]) -> str:
    if column and column[0] == "unknown":
        return f"duplicates of training images not checked: {leakage.NO_HASHES}"
    exact = column.count("exact")
    near = sum(v.startswith("near") for v in column)
    return f"duplicates of training images: {exact} exact, {near} near"


def with_segmenter(bundle: Bundle | StackBundle, segmenter: str | Path) -> Bundle | StackBundle:
    """`bundle` masking with the masks of the segmenter run `segmenter` (--segmenter);
    ConfigError for a bundle trained on unmasked images."""
    return bundle.with_segmenter(load_segmenter(segmenter))


def check_gradcam_target(path: Path | None, use_meta: bool, flag: str) -> None:
    if use_meta:
        raise ConfigError(f"{flag} shows Grad-CAM of the rule combiner's decision; it cannot "
                         f"be used with --meta")
    if path is not None and os.path.lexists(path) and not path.is_dir():
        raise ConfigError(f"{flag} {path} exists and is not a folder")


class Overlays:
    """Where predict's Grad-CAM overlays go: PNG files in the --gradcam folder (named by
    `overlay_names`), and gallery-sized copies for --report."""

    def __init__(self, files: Sequence[Path], folder: Path | None, *, keep: bool):
        self.folder, self.keep, self.kept = folder, keep, []
        self.names = dict(zip(files, overlay_names(files), strict=True)) if folder else {}

    def add(self, path: Path, rgb: np.ndarray) -> None:
        if self.folder is not None:
            write_png(self.folder / self.names[path], rgb)
        if self.keep:
            self.kept.append(np.asarray(Image.fromarray(rgb).resize((TILE_SIZE, TILE_SIZE))))

    def tiles(self, p: Predictions) -> list[Tile]:
        names = p.class_names
        return [Tile(rgb, tile_caption(None, names[d], float(p.proba[r, d])), None)
                for r, (rgb, d) in enumerate(zip(self.kept, p.decisions, strict=True))]


def _report_skip(skip: dict[str, str]) -> None:
    print(f"skipped {skip['path']}: {skip['reason']}", file=sys.stderr)


@dataclasses.dataclass(frozen=True)
class PredictedFiles:
    """What `predict_files` predicted: the table (the CSV's rows, header first), the files
    predicted and their Predictions, the skips ({"path", "reason"}, quality refusals
    included), the duplicate column, which lung masks were used and the quality gate."""

    table: list[list[str]]
    files: list[Path]
    predictions: Predictions
    skipped: list[dict[str, str]]
    duplicates: list[str]
    lung_masks: str
    quality_refused: int = 0
    quality_max: float | None = None

    @property
    def notes(self) -> list[str]:
        """The lines the HTML page opens with."""
        return [f"{len(self.files)} image(s) predicted, {len(self.skipped)} skipped"
                + (f" ({self.quality_refused} above BRISQUE {self.quality_max:g})"
                   if self.quality_max is not None else ""),
                duplicates_note(self.duplicates), f"lung masks: {self.lung_masks}"]

    def summary(self, csv_path: Path | None = None, gradcam: Path | None = None) -> str:
        """The one line the CLI ends with."""
        n, q = len(self.skipped), self.quality_refused
        return (f"predicted {len(self.files)} image(s), skipped {n - q} unreadable or "
                f"non-image entr{'y' if n - q == 1 else 'ies'}"
                + (f" and {q} image(s) above BRISQUE {self.quality_max:g}"
                   if self.quality_max is not None else "")
                + f"; {duplicates_note(self.duplicates)}"
                + ("" if self.lung_masks.startswith("none")
                   else f"; lung masks: {self.lung_masks}")
                + (f"; csv: {csv_path}" if csv_path else "")
                + (f"; {len(self.files)} Grad-CAM overlay(s) in {gradcam}" if gradcam else ""))


def predict_files(run: str | Path | Bundle | StackBundle, paths: Sequence[str | Path], *,
                  csv_path: str | Path | None = None, gradcam: str | Path | None = None,
                  report: str | Path | None = None, batch_size: int = 32,
                  use_meta: bool = False, max_pixels: int | None = None,
                  keep_lateral: bool = False, quality_max: float | None = None,
                  segmenter: str | Path | None = None,
                  on_skip: Callable[[dict[str, str]], None] | None = _report_skip
                  ) -> PredictedFiles:
    """Predict the image files in `paths` (files and folders) with the run in `run` (a run
    folder or a loaded bundle) and write what is asked.

    `csv_path`: the table as CSV, whole or not at all; `gradcam`: one Grad-CAM overlay PNG
    per predicted image into that folder (created); `report`: a self-contained HTML page of
    every prediction with its overlay (neither for a stack run or `use_meta`). `quality_max`:
    BRISQUE-score every image (a `brisque` column) and skip those above it. `segmenter`: a
    segmenter run whose masks replace the bundle's (needed for a run trained on its
    dataset's masks). `max_pixels`: None takes `$CXR_ENSEMBLES_MAX_PIXELS`, else 50 MP.
    Every skip is passed to `on_skip` (default: a `skipped PATH: REASON` line on stderr).
    ValueError / OSError / BundleError, before anything is written, for bad arguments or a
    run that cannot be loaded; ValueError when no input could be predicted.
    """
    out = Path(csv_path) if csv_path is not None else None
    gradcam = Path(gradcam) if gradcam is not None else None
    report = Path(report) if report is not None else None
    if batch_size < 1:
        raise ConfigError("--batch-size must be >= 1")
    max_pixels = pixel_budget(max_pixels)
    if out is not None:
        check_target(out)
    if gradcam is not None:
        check_gradcam_target(gradcam, use_meta, "--gradcam")
    if report is not None:
        check_target(report, "--report")
        check_gradcam_target(None, use_meta, "--report")
    gate = QualityGate(quality_max) if quality_max is not None else None
    bundle = run if isinstance(run, Bundle | StackBundle) else load_bundle(run)
    name = bundle.run_dir.name if isinstance(run, Bundle | StackBundle) else Path(run).name
    if segmenter is not None:
        bundle = with_segmenter(bundle, segmenter)
    elif bundle.needs_shipped_masks:
        raise ConfigError(f"{run if not isinstance(run, Bundle | StackBundle) else bundle.run_dir}"
                         f" was trained on the lung masks its dataset ships; image files have "
                         f"none: give --segmenter RUN (a run of python -m experiments.segment)")
    masks = lung_masks_note(bundle, "the image files", given=segmenter is not None)
    if (gradcam or report) and not isinstance(bundle, Bundle):
        raise ConfigError("--gradcam and --report need an ensemble or single-model run; a "
                         "stack run decides by its meta-classifier, which is not "
                         "differentiable")
    if gradcam is not None:
        gradcam.mkdir(parents=True, exist_ok=True)
    files, skipped = find_images(paths)
    hasher = Hasher()
    overlays = Overlays(files, gradcam, keep=report is not None)
    kept, predictions, unread = predict_images(
        bundle, files, batch_size=batch_size, use_meta=use_meta, max_pixels=max_pixels,
        skip_lateral=not keep_lateral, on_image=hasher.add, gate=gate,
        on_overlay=overlays.add if (gradcam or report) else None)
    skipped += unread
    for s in skipped if on_skip is not None else ():
        on_skip(s)
    if not kept:
        raise ConfigError(f"nothing to predict: no readable image among the inputs "
                         f"({len(skipped)} skipped)")
    duplicates = leakage.column(bundle.training_hashes(), hasher.result([str(f) for f in kept]))
    table = rows(kept, predictions, bundle.operating_point)
    if gate is not None:
        table = [[*row, q] for row, q in zip(
            table, ["brisque", *(f"{x:.3f}" for x in gate.scores)], strict=True)]
    table = [[*row, d] for row, d in zip(table, ["duplicate_of_training", *duplicates],
                                         strict=True)]
    result = PredictedFiles(table, kept, predictions, skipped, duplicates, masks,
                            gate.refused if gate else 0, quality_max)
    if report is not None:
        write_predictions_page(report, table, overlays.tiles(predictions),
                               title=f"Predictions of {name}", notes=result.notes)
    if out is not None:
        write_csv_atomic(out, table)
    return result
