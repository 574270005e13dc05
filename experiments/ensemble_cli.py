"""The shell shared by `experiments.single`, `.ova`, `.ovo` and `.cascade`: flags -> typed
config -> `ensembles.Ensemble(...).fit` -> one summary line.

A run writes a self-contained bundle into --out (see ensembles/api.py and ensembles/bundle.py):
config.json, metrics.json, report.md, plots, metrics.jsonl, tensorboard/, checkpoints/ and
outputs.npz. Bad input, a diverged member or a refused resume ends in `error: ...` (exit 2)
with no file changed.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from ensembles import Ensemble
from ensembles.evaluate.assess import summary_line
from experiments import common


def run(strategy: str, argv: Sequence[str] | None = None, description: str = "") -> Ensemble:
    """Parse the flags, train, evaluate and save one run; returns the fitted Ensemble."""
    config, target = common.parse(strategy, argv, description)
    return Ensemble(config=config).fit(out=target.out, resume=target.resume,
                                       overwrite=target.overwrite)


def main(strategy: str, description: str, argv: Sequence[str] | None = None) -> int:
    """CLI entry: run, print the summary line; bad input -> `error: ...`, exit code 2."""
    try:
        ens = run(strategy, argv, description)
    except common.CLI_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(summary_line(ens.metrics_, Path(ens.run_dir_) / "report.md"))
    return 0
