"""`python -m experiments.compare --strategies single,ova,ovo,cascade,stack --backbones
simple_cnn,cnn16 --seeds 3 [training flags]`: every strategy x backbone x seed, compared.

The training flags are those of `experiments.ova` (not --backbone, --seed, --out, --resume or
--overwrite: the comparison sets them per run); they are parsed once per backbone, so each
backbone takes its family's defaults for the flags not given. Every run's config is built
(`ensembles.config.RunConfig`) and every run folder checked before the first run trains;
runs train through `ensembles.Ensemble` and "stack" through `ensembles.Stack`.

Each (backbone, seed) trains every strategy on the same split (the seed also picks the split),
so strategies are paired on identical test examples. The analysis (`ensembles.comparison`)
reads the finished run folders only: every run's decision rules ("ovo-votes" / "ovo-coupling",
"cascade" / "cascade-tuned", "<strategy>+meta": a logistic meta-classifier on the run's
validation member outputs) are scored as their own rows and tested against the first
strategy's own rule: McNemar and a paired bootstrap of macro-F1 (patient-grouped when ids
exist) per seed, an exact sign-flip test across seeds, Holm-adjusted per backbone.
"stack" is the meta-classifier over that backbone's other runs (fitted on validation outputs).
Writes compare.csv (one row per run x variant), compare.md (mean ± std over seeds, first-seed
bootstrap CI, per-class sensitivity / specificity, calibration, training cost, tests),
compare.json, compare.png (macro-F1 per variant and backbone) and compare_curves.png (each
member's validation macro-F1 per epoch, first seed). `--reuse` resumes an interrupted
comparison, or rewrites the analysis of a finished one without training: finished runs in
--compare-out are kept once their saved config is checked against this command's
(RunConfig.differences), interrupted runs are resumed.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402

from data_pipeline.datasets import DATASETS, Dataset, load_dataset  # noqa: E402
from ensembles import Ensemble, Stack
from ensembles import bundle as bundle_lib
from ensembles.research import comparison
from ensembles.training import runs as runs_lib
from ensembles.config import META_MODELS, RunConfig, resolve  # noqa: E402
from experiments import common  # noqa: E402

STRATEGIES = ("single", "ova", "ovo", "cascade", "stack")
METRICS = ("accuracy", "macro_f1", "roc_auc_macro", "ece_before", "ece_after")
COST = ("member_epochs", "train_seconds")
N_BOOTSTRAP = 1000   # the first seed's CIs
DESCRIPTION = "Every strategy x backbone x seed, compared on paired test examples."
STACK_META = "logreg"
# Flags the comparison sets per run itself (--backbones, --seeds, --compare-out, --reuse).
_OWNED = ("--backbone", "--seed", "--out", "--resume", "--overwrite")


@dataclasses.dataclass(frozen=True)
class Planned:
    """One run of the comparison: its config (None for "stack") and folder."""

    strategy: str
    backbone: str
    seed: int
    config: RunConfig | None
    run_dir: Path


def plan(strategies, backbones, seeds: int, out: Path, flags: list[str]) -> list[Planned]:
    """Every (backbone, seed, strategy) run in training order, each with its checked config.

    The shared flags are parsed once per backbone, so every backbone takes its family's
    defaults (ensembles.config.FAMILY_DEFAULTS) for the flags not given; strategy and seed
    are then set per run. Any bad flag or setting raises before anything trains.
    """
    given = [f.split("=")[0] for f in flags if f.split("=")[0] in _OWNED]
    if given:
        raise ValueError(f"{', '.join(dict.fromkeys(given))}: the comparison sets these per run "
                         f"(use --backbones, --seeds, --compare-out and --reuse)")
    planned = []
    for backbone in backbones:
        base, _ = common.parse("ova", [*flags, "--backbone", backbone], DESCRIPTION)
        for seed in range(seeds):
            for s in strategies:
                config = None if s == "stack" else resolve(base.replace(strategy=s, seed=seed))
                planned.append(Planned(s, backbone, seed, config,
                                       out / f"{s}-{backbone}-seed{seed}"))
    return planned


def finished(run_dir: Path) -> bool:
    """Whether `run_dir` holds a complete run (its last files are written last)."""
    return all((run_dir / f).is_file() for f in ("config.json", "metrics.json", "outputs.npz"))


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
    same members: tests/test_members.py). A setting the saved config lacks takes its default."""
    doc = runs_lib.read_config(run_dir)
    if "config" not in doc:
        raise ValueError(f"--reuse: {run_dir}/config.json holds no run config (an older "
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
            raise ValueError("stack needs at least one other strategy to stack")
        differ = stack_differences(run_dir, members) if reuse and finished(run_dir) else None
        action = "reuse" if differ is not None else "train"
        if action == "train" and (run_dir / bundle_lib.COMPONENTS_DIR).exists():
            raise ValueError(f"{run_dir} already holds a stack bundle; use another "
                             f"--compare-out (or --reuse once it is finished)")
    elif reuse and finished(run_dir):
        action, differ = "reuse", reuse_differences(run_dir, run.config)
    elif reuse and (run_dir / runs_lib.CONFIG_FILE).is_file():
        action, differ = "resume", reuse_differences(run_dir, run.config)
    else:
        runs_lib.check_run_dir(run_dir, run.config, resume=False, overwrite=False)
        action, differ = "train", None
    if differ:
        raise ValueError(f"--reuse: {run_dir} was made with other settings "
                         f"({'; '.join(differ)}); use another --compare-out")
    return action


def run_all(planned: list[Planned], *, reuse: bool = False) -> None:
    """Train every planned run (every run checked first). With `reuse`, finished runs are
    kept and interrupted ones resumed."""
    actions = [decide(planned, run, reuse) for run in planned]
    for run, action in zip(planned, actions, strict=True):
        if action == "reuse":
            print(f"reusing {run.run_dir}", file=sys.stderr)
        elif run.strategy == "stack":
            print(f"stacking {run.run_dir}", file=sys.stderr)
            Stack(stacked_runs(planned, run), meta=STACK_META, seed=run.seed).fit(run.run_dir)
        else:
            print(f"{'resuming' if action == 'resume' else 'training'} {run.run_dir}",
                  file=sys.stderr)
            Ensemble(config=run.config).fit(out=run.run_dir, resume=action == "resume")


def analyse(planned: list[Planned], cross: Dataset | None = None) -> dict:
    """Every run's variants scored (the first seed with bootstrap CIs), summarised over seeds
    and tested against the first strategy's own rule, per seed and across seeds; with
    `cross`, every run's bundle evaluated on that dataset too."""
    rows = [row for p in planned for row in comparison.analyse_run(
        p.run_dir, backbone=p.backbone, seed=p.seed,
        n_bootstrap=N_BOOTSTRAP if p.seed == min(q.seed for q in planned) else 0)]
    baseline = comparison.own_variant(planned[0].run_dir)
    curves = {(p.strategy, p.backbone): comparison.learning_curves(p.run_dir)
              for p in planned if p.seed == planned[0].seed and p.strategy != "stack"}
    cross_rows = [] if cross is None else [
        {"strategy": p.strategy, "backbone": p.backbone, "seed": p.seed, "run": str(p.run_dir),
         **comparison.cross_set(p.run_dir, cross, seed=p.seed)} for p in planned]
    return {"rows": rows, "baseline": baseline, "cross_set": cross_rows,
            "summary": comparison.summarise(rows, (*METRICS, *COST)),
            "paired": comparison.paired_tests(rows, baseline),
            "across_seeds": comparison.across_seed_tests(rows, baseline), "curves": curves}


def _f(x, digits: int = 3) -> str:
    return "n/a" if x is None or np.isnan(x) else f"{x:.{digits}f}"


def _mean_std(pair, digits: int = 3) -> str:
    return "n/a" if pair[0] is None else f"{_f(pair[0], digits)} ± {_f(pair[1], digits)}"


def _ci(c) -> str:
    return "" if not c else f" [{c[0]:.3f}, {c[1]:.3f}]"


def markdown(result: dict) -> str:
    """compare.md: results, per-class, calibration, cost and test tables."""
    summary, baseline = result["summary"], result["baseline"]
    classes = list(summary[0]["per_class"])
    lines = ["# Strategy comparison", "",
             "Mean ± std over seeds; brackets: the first seed's 95% bootstrap CI (patients "
             "resampled when ids exist). Every variant is a decision rule recomputed from its "
             "run's saved validation / test member outputs (no retraining). \"X+meta\": a "
             "logistic meta-classifier fitted on the run's validation member outputs (not "
             "out-of-fold: that would need extra trainings per member).", "",
             "| variant | backbone | seeds | accuracy | macro-F1 | ROC-AUC (macro) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['backbone']} | {r['seeds']} | " + " | ".join(
        _mean_std(r[k]) + _ci(r[f"{k}_ci95_seed0"]) for k in METRICS[:3]) + " |"
        for r in summary]
    lines += ["", "## Per-class sensitivity / specificity (test, mean over seeds)", "",
              "| variant | backbone | " + " | ".join(f"{c} sens / spec" for c in classes) + " |",
              "|---|---|" + "---|" * len(classes)]
    lines += [f"| {r['variant']} | {r['backbone']} | " + " | ".join(
        f"{_f(r['per_class'][c]['sensitivity'])} / {_f(r['per_class'][c]['specificity'])}"
        for c in classes) + " |" for r in summary]
    lines += ["", "## Calibration (test ECE, 15 bins)", "",
              "Temperature fitted per variant on its validation combined probabilities "
              "(log-probabilities as logits). For \"+meta\" variants those are the meta-"
              "classifier's own training rows, so its temperature is fitted in-sample; a stack "
              "run saves no validation probabilities (n/a).", "",
              "| variant | backbone | ECE before | ECE after temperature scaling |",
              "|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['backbone']} | {_mean_std(r['ece_before'])} | "
              f"{_mean_std(r['ece_after'])} |" for r in summary]
    lines += ["", "## Training cost per run (mean ± std over seeds)", "",
              "Member-epochs: one per member per epoch trained (stacked members count while "
              "their stack trains); seconds: the training loops' time summed over epochs "
              "(validation, evaluation and compilation outside the loop not included). "
              "Variants of a run share its cost (a meta-classifier fit on validation outputs "
              "is negligible); a stack costs the runs it stacks.", "",
              "| strategy | backbone | member-epochs | training seconds |", "|---|---|---|---|"]
    lines += [f"| {s} | {b} | {_mean_std(r['member_epochs'], 1)} | "
              f"{_mean_std(r['train_seconds'], 1)} |"
              for (s, b), r in {(r["strategy"], r["backbone"]): r for r in summary}.items()]
    if result["paired"]:
        lines += ["", f"## Paired tests against {baseline} (same test examples, per seed)", "",
                  "| variant | backbone | seed | macro-F1 diff [95% CI] | bootstrap p | Holm | "
                  "McNemar p | Holm |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {t['variant']} | {t['backbone']} | {t['seed']} | "
                  f"{t['macro_f1_diff']:+.3f} [{t['diff_ci95'][0]:+.3f}, "
                  f"{t['diff_ci95'][1]:+.3f}] | {t['bootstrap_p']:.3g} | "
                  f"{t['bootstrap_p_holm']:.3g} | {t['mcnemar_p']:.3g} | "
                  f"{t['mcnemar_p_holm']:.3g} |" for t in result["paired"]]
    if result["across_seeds"]:
        lines += ["", f"## Across seeds: macro-F1 difference against {baseline}", "",
                  "Exact two-sided sign-flip permutation test of the per-seed differences (no "
                  "normality assumed, which a t-test on 3 values could not check); with n seeds "
                  "its smallest possible p is 2 / 2^n (0.25 for 3 seeds), so it cannot reach "
                  "significance at 0.05 below 6 seeds.", "",
                  "| variant | backbone | seeds | mean diff | sign-flip p | Holm | smallest "
                  "possible p |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {t['variant']} | {t['backbone']} | {len(t['seeds'])} | "
                  f"{t['mean_diff']:+.3f} | {t['p']:.3g} | {t['p_holm']:.3g} | "
                  f"{t['min_p']:.3g} |" for t in result["across_seeds"]]
    if result["cross_set"]:
        lines += ["", *_cross_markdown(result["cross_set"])]
    if result["paired"] or result["across_seeds"]:
        lines += ["", f"Holm family: per backbone, every comparison against {baseline} on that "
                  "backbone; per-seed tests: every (variant, seed) pair, McNemar and bootstrap "
                  "adjusted separately; across seeds: every variant."]
    return "\n".join(lines) + "\n"


def _cross_markdown(cross: list[dict]) -> list[str]:
    """The cross-set table: per (strategy, backbone), macro-F1 over seeds and duplicates."""
    lines = [f"## Cross-set macro-F1 ({cross[0]['dataset']}, every image of a class the "
             "model knows; each run's own rule)", "",
             "Duplicates: images of the cross set that are exact or near (perceptual hash) "
             "copies of a run's training / validation images (`ensembles.leakage`); these two "
             "columns list each seed.", "",
             "| strategy | backbone | images | macro-F1 | duplicated images | macro-F1 "
             "without duplicates |", "|---|---|---|---|---|---|"]
    for s, b in dict.fromkeys((c["strategy"], c["backbone"]) for c in cross):
        group = sorted((c for c in cross if (c["strategy"], c["backbone"]) == (s, b)),
                       key=lambda c: c["seed"])
        f1 = np.array([c["macro_f1"] for c in group])
        dup = ", ".join(str(c["duplicated_images"]) if c["leakage_checked"] else "not checked"
                        for c in group)
        clean = ", ".join(_f(c["macro_f1_without_duplicates"]) for c in group)
        lines.append(f"| {s} | {b} | {group[0]['examples']} | "
                     f"{_mean_std((f1.mean(), f1.std()))}{_ci(group[0]['macro_f1_ci95'])} | "
                     f"{dup} | {clean} |")
    return lines


def write_outputs(out: Path, result: dict) -> None:
    """compare.csv, compare.md, compare.json, compare.png and compare_curves.png."""
    rows, summary = result["rows"], result["summary"]
    classes = list(rows[0]["per_class"])
    columns = ["strategy", "variant", "backbone", "seed", *METRICS, "temperature", *COST]
    with (out / "compare.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow([*columns, *(f"{s}_{c}" for c in classes
                                for s in ("sensitivity", "specificity")), "run"])
        for r in rows:
            w.writerow([*(r[k] for k in columns), *(r["per_class"][c][s] for c in classes
                                                     for s in ("sensitivity", "specificity")),
                        r["run"]])
    (out / "compare.md").write_text(markdown(result))
    plain = [{k: v for k, v in r.items() if k not in ("y", "proba", "pred", "ids")}
             for r in rows]
    (out / "compare.json").write_text(json.dumps(
        {"baseline": result["baseline"], "runs": plain, "summary": summary,
         "paired": result["paired"], "across_seeds": result["across_seeds"],
         "cross_set": result["cross_set"]},
        indent=1, default=float))
    _plot_summary(summary, out / "compare.png")
    _plot_curves(result["curves"], out / "compare_curves.png")


def _plot_summary(summary: list[dict], path: Path) -> None:
    """Macro-F1 per variant and backbone: the mean over seeds (dot) ± std (thick bar) and the
    first seed's 95% CI (thin bar), with each backbone's single-model mean as a dashed line, on
    an axis fitted to the values so that differences of 0.01 show."""
    variants = list(dict.fromkeys(r["variant"] for r in summary))
    bbs = list(dict.fromkeys(r["backbone"] for r in summary))
    fig, ax = plt.subplots(figsize=(2.5 + 0.8 * len(variants), 4.5))
    width = 0.8 / len(bbs)
    for i, b in enumerate(bbs):
        rows = {r["variant"]: r for r in summary if r["backbone"] == b}
        color = f"C{i}"
        for j, v in enumerate(variants):
            if v not in rows:
                continue
            x = j + (i - (len(bbs) - 1) / 2) * width
            mean, std = rows[v]["macro_f1"]
            ci = rows[v]["macro_f1_ci95_seed0"]
            if ci:
                ax.plot([x, x], ci, color=color, lw=1, alpha=0.6)
            ax.errorbar(x, mean, yerr=std, fmt="o", color=color, elinewidth=3, capsize=0,
                        label=b if j == 0 else None)
        if "single" in rows:
            ax.axhline(rows["single"]["macro_f1"][0], color=color, ls="--", lw=0.8)
    ax.set_xticks(np.arange(len(variants)), variants, rotation=30, ha="right")
    ax.set_ylabel("test macro-F1")
    ax.set_title("mean ± std over seeds (thick), first seed's 95% CI (thin); "
                 "dashed: single model", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_curves(curves: dict, path: Path) -> None:
    """Validation macro-F1 per epoch of every member, one panel per (strategy, backbone)."""
    keys = list(curves)
    cols = min(4, len(keys))
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.5 * cols, 3 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        for member, points in curves[key].items():
            e, v = zip(*points, strict=True)
            ax.plot(e, v, marker=".", label=member)
        ax.set_title(f"{key[0]}, {key[1]} (first seed)", fontsize=9)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("validation macro-F1 (member's task)")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _names(text: str, what: str, allowed=None) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if allowed is not None and n not in allowed]
    if unknown or not names:
        raise ValueError(f"unknown {what} {unknown}; choose from {', '.join(allowed)}"
                         if allowed is not None else f"--{what}: give at least one name")
    if len(set(names)) != len(names):
        raise ValueError(f"--{what}: {', '.join(names)} repeats a name")
    return names


def _option(text: str) -> tuple[str, int | float | str]:
    """KEY=VALUE of --cross-option, the value as int, float or text."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"--cross-option {text!r}: give KEY=VALUE")
    for kind in (int, float):
        try:
            return key, kind(value)
        except ValueError:
            pass
    return key, value


def main(argv: list[str] | None = None) -> int:
    # allow_abbrev=False: --seed / --backbone are refused training flags, not --seeds /
    # --backbones abbreviated
    parser = argparse.ArgumentParser(prog="python -m experiments.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--strategies", default="single,ova,ovo,cascade,stack")
    parser.add_argument("--backbones", default="simple_cnn,cnn16")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--compare-out", default=None,
                        help="output folder (default runs/compare-all-<UTC time>)")
    parser.add_argument("--reuse", action="store_true",
                        help="keep runs already finished in --compare-out (same settings, "
                             "checked), resume interrupted ones and train only the missing "
                             "ones: resumes a comparison")
    parser.add_argument("--cross-dataset", choices=DATASETS, default=None,
                        help="also evaluate every run's bundle on this whole dataset, with "
                             "the leakage check against its training images")
    parser.add_argument("--cross-data-dir", default=None,
                        help="the cross set's folder (built under the runs' --cache-dir)")
    parser.add_argument("--cross-option", action="append", default=[], metavar="KEY=VALUE",
                        help="a load_dataset option of the cross set (e.g. num_classes=2); "
                             "repeatable")
    args, flags = parser.parse_known_args(argv)
    try:
        strategies = _names(args.strategies, "strategy", STRATEGIES)
        if "stack" in strategies and strategies.index("stack") != len(strategies) - 1:
            strategies = [s for s in strategies if s != "stack"] + ["stack"]
        if args.seeds < 1:
            raise ValueError("--seeds must be >= 1")
        out = (Path(args.compare_out) if args.compare_out else
               runs_lib.default_run_dir("compare", "all"))
        planned = plan(strategies, _names(args.backbones, "backbones"), args.seeds, out, flags)
        cross = None if args.cross_dataset is None else load_dataset(   # checked first
            args.cross_dataset, data_dir=args.cross_data_dir,
            cache_dir=planned[0].config.data.cache_dir,
            progress=planned[0].config.training.progress,
            **dict(_option(o) for o in args.cross_option))
        out.mkdir(parents=True, exist_ok=True)
        run_all(planned, reuse=args.reuse)
        write_outputs(out, analyse(planned, cross))
    except common.CLI_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print((out / "compare.md").read_text())
    print(f"report: {out / 'compare.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
