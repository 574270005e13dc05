"""The shell shared by `experiments.single`, `.ova`, `.ovo` and `.cascade`: flags -> typed
config -> `ensembles.Ensemble(...).fit` -> one summary line.

A run writes a self-contained bundle into --out (docs/run-folder.md): config.json,
metrics.json, report.html and report.md, plots, metrics.jsonl, tensorboard/, checkpoints/ and
outputs.npz. Bad input, a diverged member or a refused resume ends in `error: ...` (exit 2)
with no file changed; anything else is a bug and shows its traceback.
"""

from __future__ import annotations

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
    """CLI entry: run, print the summary line; the user's errors -> `error: ...`, exit 2."""
    try:
        ens = run(strategy, argv, description)
    except Exception as error:   # noqa: BLE001 (fail re-raises what is not the user's)
        return common.fail(error, argv)
    print(summary_line(ens.metrics_, Path(ens.run_dir_) / "report.html"))
    return 0
