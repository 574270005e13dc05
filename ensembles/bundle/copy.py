"""Copying a run's pieces (a stack bundle's components, `Ensemble.save`), checked after."""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from ensembles.bundle.integrity import CONFIG_FILE, pieces_of
from ensembles.bundle.load import check, read_config, section_of
from ensembles.bundle.schema import BundleError


def bundle_pieces(run_dir: str | Path) -> list[Path]:
    """The paths (relative to run_dir) load_bundle reads: config.json, combiner, member
    checkpoints, meta and training-hashes files of an ensemble, once checked as load_bundle
    checks them (weights aside). BundleError if one is missing or changed, or the run is
    foreign or a stack."""
    run_dir = Path(run_dir)
    section = section_of(run_dir, read_config(run_dir))
    if section is not None and section["kind"] == "stack":
        raise BundleError(f"{run_dir} is a stack bundle; stack the runs it was built from")
    checked = check(run_dir)
    return [Path(CONFIG_FILE), *(Path(p) for p in pieces_of(checked.section))]


def copy_bundle(run_dir: str | Path, dest: str | Path, pieces: Sequence[Path]) -> None:
    """Copy `pieces` of run_dir into dest (a new folder), hard-linking files where the
    filesystem allows (checkpoints are written once, so links are safe and cost no space);
    a copy holding config.json is then checked as load_bundle checks it (digests included)."""
    run_dir, dest = Path(run_dir), Path(dest)
    for piece in pieces:
        target = dest / piece
        target.parent.mkdir(parents=True, exist_ok=True)
        if (run_dir / piece).is_dir() and not (run_dir / piece).is_symlink():
            shutil.copytree(run_dir / piece, target, symlinks=True,
                            copy_function=_link_or_copy)
        else:
            _link_or_copy(run_dir / piece, target)
    if Path(CONFIG_FILE) in map(Path, pieces):
        check(dest)


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)
