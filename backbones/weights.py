"""Fetch the official Keras ImageNet weight files into the weights cache, verified by MD5.

    path = fetch("densenet121", include_top=False)   # downloads once, then the cached file

A file comes from {RELEASE}/{folder}/{Keras file name} ($CXR_ENSEMBLES_WEIGHTS_URL replaces
the base, for mirrors) into `default_weights_path`'s folder ($CXR_ENSEMBLES_WEIGHTS). It is
written to NAME.part beside its place, resumed with an HTTP Range request where an earlier
download stopped, and renamed into place only once its MD5 is the official Keras hash, so the
cache never holds a partial or foreign download. Two processes fetching the same file take
turns on NAME.lock (fcntl.flock): the second finds the file in place. CXR_ENSEMBLES_OFFLINE=1
never touches the network. Errors are OSError or ValueError subclasses with one-line messages,
which the CLIs report as `error: ...`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import http.client
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from tqdm.auto import tqdm

from backbones.pretrained import (
    KERAS,
    RELEASE,
    default_weights_path,
    file_md5,
    keras_file_name,
    keras_spec,
)

TIMEOUT_S = 5.0  # connect, and longest stall mid-download, before giving up (resumable)
CHUNK = 1 << 20


class WeightsDownloadError(OSError):
    """A weight file could not be downloaded, or its download is not the official file."""


@dataclasses.dataclass(frozen=True)
class CachedFile:
    """One weight file in the cache and whether its MD5 is the official Keras one."""

    name: str
    include_top: bool
    path: Path
    size: int
    verified: bool


def url(name: str, include_top: bool) -> str:
    """Where the file is published: the Keras release, or $CXR_ENSEMBLES_WEIGHTS_URL's mirror."""
    base = os.environ.get("CXR_ENSEMBLES_WEIGHTS_URL") or RELEASE
    return f"{base.rstrip('/')}/{keras_spec(name).folder}/{keras_file_name(name, include_top)}"


def official_md5(name: str, include_top: bool) -> str:
    """The Keras hash of the with-top or the notop file."""
    return keras_spec(name).md5[0 if include_top else 1]


def fetch(name: str, include_top: bool, *, progress: bool = True) -> Path:
    """The cached weight file of `name`, downloaded and verified first when it is missing.

    A file already in the cache is returned as is (`load_pretrained` warns if it is not
    official). A failed or interrupted download raises WeightsDownloadError; running again
    resumes it. A download whose MD5 is not official is deleted before it raises.
    """
    target = default_weights_path(name, include_top)
    if target.is_file():
        return target
    source = url(name, include_top)
    if os.environ.get("CXR_ENSEMBLES_OFFLINE", "") not in ("", "0"):
        raise FileNotFoundError(
            f"{target} not found and CXR_ENSEMBLES_OFFLINE is set: download {target.name} "
            f"from {source} into {target.parent} (or set CXR_ENSEMBLES_WEIGHTS)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.with_name(target.name + ".lock"), target.name, progress):
        if target.is_file():  # another process placed it while we waited
            return target
        part = target.with_name(target.name + ".part")
        try:
            _download(source, part, progress)
        except WeightsDownloadError:
            raise
        except (OSError, http.client.HTTPException) as error:  # URLError, timeouts, resets
            reason = getattr(error, "reason", None) or error
            if isinstance(error, urllib.error.HTTPError):
                reason = f"HTTP {error.code} {reason}"
            raise WeightsDownloadError(
                f"cannot download {source} ({reason}); put {target.name} into {target.parent} "
                f"by hand, or set CXR_ENSEMBLES_WEIGHTS_URL to a mirror") from None
        digest, want = file_md5(part), official_md5(name, include_top)
        if digest != want:
            part.unlink()
            raise WeightsDownloadError(
                f"{source}: MD5 {digest} is not the official Keras hash {want}; the download "
                f"was deleted and nothing was placed in {target.parent}")
        os.replace(part, target)
    return target


def list_cached() -> list[CachedFile]:
    """Every Keras weight file (with or without top) in the cache, hashed."""
    cached = []
    for name in KERAS:
        for include_top in (False, True):
            path = default_weights_path(name, include_top)
            if path.is_file():
                cached.append(CachedFile(name, include_top, path, path.stat().st_size,
                                         file_md5(path) == official_md5(name, include_top)))
    return cached


def _download(source: str, part: Path, progress: bool) -> None:
    """Append the rest of `source` to `part`, from its current size; start over if the server
    ignores the Range request. WeightsDownloadError if the body ends before Content-Length."""
    offset = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(source, headers={"Range": f"bytes={offset}-"} if offset
                                     else {})
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as error:
        if error.code == 416 and offset:  # nothing past `offset`: the part is whole (or bad)
            error.close()
            return
        raise
    with response:
        if response.status != 206:  # a fresh download, or a server without ranges
            offset = 0
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        with part.open("ab" if offset else "wb") as file, tqdm(
                total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                desc=part.name.removesuffix(".part"), disable=not progress) as bar:
            for chunk in iter(lambda: response.read(CHUNK), b""):
                file.write(chunk)
                bar.update(len(chunk))
            size = file.tell()
    if total is not None and size < total:
        raise WeightsDownloadError(
            f"{source}: the transfer stopped at {size} of {total} bytes; run again to resume "
            f"from {part}")


@contextlib.contextmanager
def _locked(lock: Path, what: str, progress: bool) -> Iterator[None]:
    """Hold an exclusive flock on `lock`, removed on exit. A waiter whose lock file was removed
    meanwhile locks the new one, so only one holder exists at a time."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if progress:
                    print(f"waiting for another process downloading {what}", file=sys.stderr)
                fcntl.flock(fd, fcntl.LOCK_EX)
            with contextlib.suppress(FileNotFoundError):
                if os.path.samestat(os.fstat(fd), os.stat(lock)):
                    break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)
