"""Whole-or-nothing file writes: a reader sees the old file or the complete new one, never a
part (a crash or an error mid-write leaves no partial file that looks complete)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w", **open_kwargs: Any) -> Iterator[IO]:
    """Open a temporary file beside `path` (mode "w" or "wb"); on a clean exit it is flushed,
    fsynced, made world-readable (0644: mkstemp's 0600 would hide results from other
    readers) and renamed over `path`; on an error it is removed and `path` is untouched."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, mode, **open_kwargs) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
