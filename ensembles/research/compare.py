"""The strategy comparison as a library: plan every strategy x backbone x seed run, train
them (or reuse finished ones), analyse the finished run folders and write the report.

    from ensembles.research import compare
    bases = compare.base_configs(["simple_cnn", "cnn16"], epochs=2)   # or any RunConfigs
    planned = compare.plan(["single", "ova", "stack"], bases, seeds=3, out=Path("runs/cmp"))
    result = compare.run(planned, Path("runs/cmp"))   # trains, analyses, writes compare.*

Each (backbone, seed) trains every strategy on the same split (the seed also picks the split),
so strategies are paired on identical test examples. The analysis
(`ensembles.research.comparison`) reads the finished run folders only; the report
(`ensembles.research.compare_report`) writes compare.csv, compare.md, compare.json,
compare.png and compare_curves.png. `python -m experiments.compare` is this module's CLI.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from data_pipeline.datasets import Dataset
from ensembles import bundle as bundle_lib
from ensembles.api import Ensemble, Stack
from ensembles.config import META_MODELS, ConfigError, RunConfig, make_config, resolve
from ensembles.research import comparison
from ensembles.research.compare_report import COST, METRICS, write_outputs
from ensembles.training import runs as runs_lib

STRATEGIES = ("single", "ova", "ovo", "cascade", "stack")
N_BOOTSTRAP = 1000   # the first seed's CIs
STACK_META = "logreg"


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


@dataclasses.dataclass(frozen=True)
class Planned:
    """One run of the comparison: its config (None for "stack") and folder."""

    strategy: str
    backbone: str
    seed: int
    config: RunConfig | None
    run_dir: Path


def check_strategies(strategies: Sequence[str]) -> list[str]:
    """The strategies, checked (known, none repeated, at least one), "stack" moved last (it
    stacks the runs before it); ValueError otherwise."""
    names = list(strategies)
    unknown = [n for n in names if n not in STRATEGIES]
    if unknown or not names:
        raise ConfigError(f"unknown strategy {unknown}; choose from {', '.join(STRATEGIES)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"--strategy: {', '.join(names)} repeats a name")
    return [s for s in names if s != "stack"] + ["stack"] * ("stack" in names)


def base_configs(backbones: Sequence[str], **settings) -> dict[str, RunConfig]:
    """{backbone: config} with `settings` (RunConfig field names) and each backbone's family
    defaults for the rest, as the CLI's training flags give them."""
    return {b: make_config("ova", **{**settings, "backbone": b}) for b in backbones}


def plan(strategies: Sequence[str], bases: Mapping[str, RunConfig], seeds: int,
         out: Path) -> list[Planned]:
    """Every (backbone, seed, strategy) run in training order, each with its checked config.

    `bases` maps each backbone to the config its runs start from (its strategy and seed are
    set per run), so every backbone keeps its own family's defaults. Any bad setting raises
    before anything trains.
    """
    strategies = check_strategies(strategies)
    if seeds < 1:
        raise ConfigError("--seeds must be >= 1")
    planned = []
    for backbone, base in bases.items():
        base = base.replace(backbone=backbone)
        for seed in range(seeds):
            for s in strategies:
                config = None if s == "stack" else resolve(base.replace(strategy=s, seed=seed))
                planned.append(Planned(s, backbone, seed, config,
                                       Path(out) / f"{s}-{backbone}-seed{seed}"))
    return planned


def finished(run_dir: Path) -> bool:
    """Whether `run_dir` holds a complete run (its last files are written last)."""
    return all((Path(run_dir) / f).is_file()
               for f in ("config.json", "metrics.json", "outputs.npz"))


def stacked_runs(planned: list[Planned], run: Planned) -> list[Path]:
    """The runs a "stack" run stacks: its (backbone, seed)'s other runs before it, the
    single model left out unless it is the only one."""
    before = [p for p in planned[:planned.index(run)]
              if (p.backbone, p.seed) == (run.backbone, run.seed) and p.strategy != "stack"]
    return [p.run_dir for p in before if p.strategy != "single"] or [p.run_dir for p in before]


def reuse_differences(run_dir: Path, expected: RunConfig) -> list[str]:
    """`section.name: saved vs expected` for each setting of the run in `run_dir` that
    differs from `expected`, apart from those that say how a run executes, not what it
    computes (RunConfig.differences skips them; and stacked and sequential members train the
    same members: tests/ensembles/training/test_members.py). A setting the saved config lacks takes its default."""
    doc = runs_lib.read_config(run_dir)
    if "config" not in doc:
        raise ConfigError(f"--reuse: {run_dir}/config.json holds no run config (an older "
                         f"run); use another --compare-out")
    saved = RunConfig.from_dict(doc["config"])
    return expected.differences(saved.replace(members=expected.training.members))


def stack_differences(run_dir: Path, members: list[Path]) -> list[str]:
    """What differs between the stack run in `run_dir` and the stack of `members`."""
    doc = runs_lib.read_config(run_dir)
    expected = {"runs": [str(r) for r in members], "meta_model": META_MODELS[STACK_META]}
    return [f"{k}: {doc.get(k)!r} vs {v!r}" for k, v in expected.items() if doc.get(k) != v]


def decide(planned: list[Planned], run: Planned, reuse: bool) -> str:
    """"reuse" (a finished run, settings checked), "resume" (an interrupted one, with
    `reuse`) or "train"; ValueError, before anything trains, for a run that cannot go on."""
    run_dir = run.run_dir
    if run.strategy == "stack":
        members = stacked_runs(planned, run)
        if not members:
            raise ConfigError("stack needs at least one other strategy to stack")
        differ = stack_differences(run_dir, members) if reuse and finished(run_dir) else None
        action = "reuse" if differ is not None else "train"
        if action == "train" and (run_dir / bundle_lib.COMPONENTS_DIR).exists():
            raise ConfigError(f"{run_dir} already holds a stack bundle; use another "
                             f"--compare-out (or --reuse once it is finished)")
    elif reuse and finished(run_dir):
        action, differ = "reuse", reuse_differences(run_dir, run.config)
    elif reuse and (run_dir / runs_lib.CONFIG_FILE).is_file():
        action, differ = "resume", reuse_differences(run_dir, run.config)
    else:
        runs_lib.check_run_dir(run_dir, run.config, resume=False, overwrite=False)
        action, differ = "train", None
    if differ:
        raise ConfigError(f"--reuse: {run_dir} was made with other settings "
                         f"({'; '.join(differ)}); use another --compare-out")
    return action


def train(planned: list[Planned], *, reuse: bool = False,
          log: Callable[[str], None] = _stderr) -> list[str]:
    """Train every planned run (every run checked first); with `reuse`, finished runs are
    kept and interrupted ones resumed. Each run's action ("reuse", "resume", "train")."""
    actions = [decide(planned, run, reuse) for run in planned]
    for run, action in zip(planned, actions, strict=True):
        if action == "reuse":
            log(f"reusing {run.run_dir}")
        elif run.strategy == "stack":
            log(f"stacking {run.run_dir}")
            Stack(stacked_runs(planned, run), meta=STACK_META, seed=run.seed).fit(run.run_dir)
        else:
            log(f"{'resuming' if action == 'resume' else 'training'} {run.run_dir}")
            Ensemble(config=run.config).fit(out=run.run_dir, resume=action == "resume")
    return actions




def analyse(planned: list[Planned], cross: Dataset | None = None, *,
            n_bootstrap: int = N_BOOTSTRAP) -> dict:
    """Every run's variants scored (the first seed with bootstrap CIs), summarised over seeds
    and tested against the first strategy's own rule, per seed and across seeds; with
    `cross`, every run's bundle evaluated on that dataset too."""
    first = min(q.seed for q in planned)
    rows = [row for p in planned for row in comparison.analyse_run(
        p.run_dir, backbone=p.backbone, seed=p.seed,
        n_bootstrap=n_bootstrap if p.seed == first else 0)]
    curves = {(p.strategy, p.backbone): comparison.learning_curves(p.run_dir)
              for p in planned if p.seed == planned[0].seed and p.strategy != "stack"}
    cross_rows = [] if cross is None else [
        {"strategy": p.strategy, "backbone": p.backbone, "seed": p.seed, "run": str(p.run_dir),
         **comparison.cross_set(p.run_dir, cross, seed=p.seed)} for p in planned]
    return analysis(rows, comparison.own_variant(planned[0].run_dir), curves=curves,
                    cross_set=cross_rows)


def analysis(rows: list[dict], baseline: str, *, curves: dict | None = None,
             cross_set: list[dict] | None = None) -> dict:
    """The comparison's analysis of scored variant rows (`comparison.analyse_run`'s, or any
    with its keys): the summary over seeds, the paired tests against `baseline` per seed and
    the sign-flip tests across seeds, with the learning curves and cross-set rows given."""
    return {"rows": rows, "baseline": baseline, "cross_set": list(cross_set or []),
            "summary": comparison.summarise(rows, (*METRICS, *COST)),
            "paired": comparison.paired_tests(rows, baseline),
            "across_seeds": comparison.across_seed_tests(rows, baseline),
            "curves": dict(curves or {})}


def run(planned: list[Planned], out: Path, *, reuse: bool = False,
        cross: Dataset | None = None, log: Callable[[str], None] = _stderr) -> dict:
    """The whole comparison: `out` created, every run trained (or reused / resumed with
    `reuse`), analysed (`analyse`) and written into `out` (compare.csv, compare.md,
    compare.json, compare.png, compare_curves.png); the analysis."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train(planned, reuse=reuse, log=log)
    result = analyse(planned, cross)
    write_outputs(out, result)
    return result
