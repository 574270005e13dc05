"""Run directories: where a run goes, config.json, and what a resume may change.

Every check happens before the first write: a refused command (a non-empty folder without
overwrite, a resume of a missing run or with other settings) leaves every file as it was.
config.json is written atomically (temporary file, then rename).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax

from backbones.training import distributed
from data_pipeline.atomic import atomic_write
from ensembles.config import ConfigError, RunConfig

CONFIG_FILE = "config.json"
LOCK_FILE = ".lock"


def default_run_dir(experiment: str, backbone: str) -> Path:
    """runs/<experiment>-<backbone>-<UTC time>/"""
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{experiment}-{backbone}-{stamp}"


def read_config(run_dir: Path) -> dict:
    """The parsed config.json of a run; ValueError if it is missing or not JSON."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{run_dir} has no {CONFIG_FILE}: not a run of this project")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path} is not valid JSON ({error.msg})") from None


def check_run_dir(out: Path, config: RunConfig, *, resume: bool, overwrite: bool) -> None:
    """Refuse, before anything is written, what would damage or mix up a run."""
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other")
    if resume:
        if not out.is_dir():
            raise ConfigError(f"nothing to resume: {out} does not exist")
        saved = read_config(out)
        if "config" not in saved:
            raise ConfigError(f"{out}/{CONFIG_FILE} holds no run config: cannot resume it")
        differ = config.differences(RunConfig.from_dict(saved["config"]))
        if differ:
            raise ConfigError(f"--resume with other settings than the run's "
                              f"({'; '.join(differ)}); resume with the run's own settings")
        return
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ConfigError(f"run directory {out} exists and is not empty; pass --overwrite to "
                          f"replace it or --resume to continue it")


def open_run_dir(out: Path, *, resume: bool, overwrite: bool) -> Path:
    """Create (or, with overwrite, empty) the run directory checked by `check_run_dir`.

    With several processes sharing the folder every one has checked it before process 0
    changes it, and none goes on before it is ready."""
    distributed.barrier(f"checked {out}")
    if distributed.is_primary():
        if not resume and overwrite and out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        out.mkdir(parents=True, exist_ok=True)
    distributed.barrier(f"opened {out}")
    return out


@contextlib.contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on the run directory while a run writes into it: a second
    writer (a concurrent --resume, or two commands given the same folder) is refused with a
    clear message instead of mixing its state in. The lock file stays empty and is never
    rewritten, so taking it changes no file of a run being resumed. Process 0 holds it for
    all processes of a multi-process run (they share the folder)."""
    if not distributed.is_primary():
        yield
        return
    with open(Path(out) / LOCK_FILE, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"{out} is in use by another run (its {LOCK_FILE} is locked); "
                              f"wait for it to finish") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_json_atomic(path: Path, doc: Any) -> Path:
    """Write JSON into a temporary file beside `path`, then rename it into place."""
    path = Path(path)
    with atomic_write(path) as fh:
        fh.write(json.dumps(doc, indent=2, default=str) + "\n")
    return path


def write_config(out: Path, config: RunConfig, **facts: Any) -> Path:
    """config.json: the run's config, the command line, the JAX setup and `facts`. Only
    process 0 writes it."""
    path = out / CONFIG_FILE
    if not distributed.is_primary():
        return path
    return write_json_atomic(path, {
        "config": config.to_dict(), **facts, "argv": sys.argv,
        "jax": {"version": jax.__version__, "backend": jax.default_backend(),
                "processes": jax.process_count(),
                "devices": [str(d) for d in jax.devices()]}})
