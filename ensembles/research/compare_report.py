"""The comparison's report: compare.csv (one row per run x variant), compare.md (mean ± std
over seeds, first-seed bootstrap CI, per-class sensitivity / specificity, calibration, training
cost, tests), compare.json, compare.png (macro-F1 per variant and backbone) and
compare_curves.png (each member's validation macro-F1 per epoch, first seed), from the
analysis of `ensembles.research.compare.analyse`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

METRICS = ("accuracy", "macro_f1", "roc_auc_macro", "ece_before", "ece_after")
COST = ("member_epochs", "train_seconds")


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
             "copies of a run's training / validation images (`data_pipeline.leakage`); these two "
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
