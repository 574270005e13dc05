"""Stacking as a library: train every strategy x backbone (or take finished runs), then fit
a meta-classifier over their members (`ensembles.api.Stack`) into a stack bundle.

    from ensembles.research import stacks
    planned = stacks.plan_runs(["ova", "ovo"], {"simple_cnn": make_config(epochs=2)}, out)
    stacked = stacks.train_and_stack(planned, out, meta="logreg")

`python -m experiments.stack` is this module's CLI.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from ensembles import bundle as bundle_lib
from ensembles.api import Ensemble, Stack
from ensembles.config import ConfigError, RunConfig, resolve
from ensembles.training import runs as runs_lib


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def plan_runs(strategies: Sequence[str], bases: Mapping[str, RunConfig], out: Path
              ) -> list[tuple[RunConfig, Path]]:
    """(config, run folder out/<strategy>-<backbone>) of every strategy x backbone, in
    backbone order; `bases` maps each backbone to the config its runs start from (its
    strategy is set per run, so each keeps its family's defaults). ValueError for a bad
    setting or "stack" among the strategies."""
    if "stack" in strategies:
        raise ConfigError("--strategies: list the strategies to stack (single, ova, ovo, "
                         "cascade), not stack itself")
    return [(resolve(base.replace(backbone=backbone, strategy=strategy)),
             Path(out) / f"{strategy}-{backbone}")
            for backbone, base in bases.items() for strategy in strategies]


def check_out(out: Path) -> None:
    """ValueError if `out` already holds a stack bundle (checked before anything trains)."""
    if (Path(out) / bundle_lib.COMPONENTS_DIR).exists():
        raise ConfigError(f"{out} already holds a stack bundle; choose another --stack-out")


def train_runs(planned: Sequence[tuple[RunConfig, Path]], *, resume: bool = False,
               overwrite: bool = False, log: Callable[[str], None] = _stderr) -> list[Path]:
    """Train every planned run (every config and run folder checked before the first
    training); the run folders."""
    for config, run_dir in planned:
        runs_lib.check_run_dir(run_dir, config, resume=resume, overwrite=overwrite)
    for config, run_dir in planned:
        log(f"training {run_dir}")
        Ensemble(config=config).fit(out=run_dir, resume=resume, overwrite=overwrite)
    return [run_dir for _, run_dir in planned]


def stack(runs: Sequence[str | Path], out: Path, *, meta: str = "logreg", seed: int = 0
          ) -> Stack:
    """The fitted Stack of finished `runs` (a meta-classifier over their members), saved in
    `out` as a stack bundle."""
    check_out(out)
    return Stack([Path(r) for r in runs], meta=meta, seed=seed).fit(Path(out))


def train_and_stack(planned: Sequence[tuple[RunConfig, Path]], out: Path, *,
                    meta: str = "logreg", resume: bool = False, overwrite: bool = False,
                    log: Callable[[str], None] = _stderr) -> Stack:
    """Train the planned runs (`train_runs`), then stack them into `out` with the first
    run's seed."""
    check_out(out)
    members = train_runs(planned, resume=resume, overwrite=overwrite, log=log)
    return stack(members, out, meta=meta, seed=planned[0][0].training.seed)
