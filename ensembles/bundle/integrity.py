"""Paths inside a run and the SHA-256 manifest of its pieces: a bundle loads only what it
contains, intact."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from ensembles.bundle.schema import MANIFEST_KEY, BundleError

CONFIG_FILE = "config.json"
COMBINER_FILE = "combiner.json"
COMPONENTS_DIR = "components"


def inside(run_dir: Path, rel, where: str) -> Path:
    """run_dir/rel for a path named in run_dir's config.json: relative, canonical, without
    "..", and without a symbolic link on the way; BundleError naming it otherwise."""
    config = run_dir / CONFIG_FILE
    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel:
        raise BundleError(f"{config}: {where} {rel!r} is not a path inside the run")
    pure = PurePosixPath(rel)
    if pure.is_absolute() or ".." in pure.parts:
        raise BundleError(f"{config}: {where} {rel!r} points outside the run folder")
    if not pure.parts or pure.as_posix() != rel or rel == CONFIG_FILE:
        raise BundleError(f"{config}: {where} {rel!r} is not a canonical path of a bundle piece")
    path = run_dir
    for part in pure.parts:
        path = path / part
        if path.is_symlink():
            raise BundleError(f"{path} is a symbolic link: a bundle holds its own files, so "
                              f"{where} may not lead out of it")
    if path.exists() and not path.resolve().is_relative_to(run_dir.resolve()):
        raise BundleError(f"{path} resolves outside the run folder {run_dir}")
    return path


def piece_files(run_dir: Path, rel: str) -> list[str]:
    """Every file of the piece rel (a file, or a folder of regular files), relative to
    run_dir, sorted; BundleError on a symbolic link, a non-regular or unreadable entry."""
    path = run_dir / rel
    if path.is_file():
        return [rel]
    found = []

    def refuse(error: OSError):
        raise BundleError(f"{error.filename}: cannot read the bundle folder ({error.strerror})")

    for root, dirs, files in os.walk(path, onerror=refuse):
        dirs.sort()
        for name in sorted(dirs + files):
            entry = Path(root) / name
            if entry.is_symlink():
                raise BundleError(f"{entry} is a symbolic link: a bundle holds its own files")
            if name in files and not entry.is_file():
                raise BundleError(f"{entry} is not a regular file")
            if name in files:
                found.append(entry.relative_to(run_dir).as_posix())
    return sorted(found)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    except OSError as error:
        raise BundleError(f"{path}: cannot read ({error.strerror})") from None
    return digest.hexdigest()


def pieces_of(section: dict) -> list[str]:
    """The pieces (files or folders, relative to the run) a bundle section names, config.json
    aside: combiner, member checkpoints, meta and training-hashes files; for a stack its meta
    and components."""
    if section["kind"] == "stack":
        return [section["meta"], *(c["path"] for c in section["components"])]
    return [section["combiner"], *(e["path"] for e in section["stacks"]),
            *([section["meta"]] if section.get("meta") else []),
            *([section["train_hashes"]] if section.get("train_hashes") else [])]


def manifest(run_dir: str | Path, pieces: Sequence[str]) -> dict[str, str]:
    """{file: SHA-256 hex digest} for every file of `pieces` (relative to run_dir), sorted."""
    run_dir = Path(run_dir)
    files = [f for rel in pieces for f in piece_files(run_dir, str(rel))]
    return {f: _sha256(run_dir / f) for f in sorted(files)}


def add_manifest(run_dir: str | Path, section: dict) -> dict:
    """The bundle section with its "files" manifest: call once every piece is written and
    before config.json (which holds the section) is."""
    return {**section, MANIFEST_KEY: manifest(run_dir, pieces_of(section))}


def verify(run_dir: Path, section: dict) -> None:
    """Every file of the pieces is listed in the manifest, every listed file is there, and
    each has its recorded digest; BundleError naming the first file that does not."""
    config, files = run_dir / CONFIG_FILE, section[MANIFEST_KEY]
    pieces = pieces_of(section)
    for rel in files:
        inside(run_dir, rel, "a manifest entry")
        if not any(rel == p or rel.startswith(p + "/") for p in pieces):
            raise BundleError(f"{config}: the manifest lists {rel}, which is not in a piece of "
                              f"the bundle")
    found = [f for rel in pieces for f in piece_files(run_dir, rel)]
    for rel in found:
        if rel not in files:
            raise BundleError(f"{run_dir / rel} is not in the manifest of {config}: the bundle "
                              f"was changed after it was saved")
    present = set(found)
    for rel, digest in files.items():
        if rel not in present:
            raise BundleError(f"incomplete run: {run_dir / rel} is missing (listed in the "
                              f"manifest of {config})")
        if _sha256(run_dir / rel) != digest:
            raise BundleError(f"{run_dir / rel} does not match its SHA-256 digest in {config}: "
                              f"the file changed after the run was saved (corrupt or tampered)")


