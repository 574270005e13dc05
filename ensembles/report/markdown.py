"""The report.md text of a run: the verdict beside chance, the classification table with CIs,
confusion matrix, ROC-AUC and calibration."""

from __future__ import annotations

from collections.abc import Mapping

from ensembles.combine.calibration import DEFAULT_BINS
from ensembles.evaluate.metrics import chance_level, classes_present, includes_chance
from ensembles.evaluate.tables import fmt, fmt_ci, markdown_table


def verdict_lines(metrics: Mapping) -> list[str]:
    """The report's first lines: the headline numbers beside chance (1 / the classes present in
    the test labels), and a warning when the macro-F1 CI reaches chance (the model did not
    learn what the test set measures)."""
    ci = metrics.get("ci95") or {}
    k = classes_present(metrics)
    lines = [f"**Result:** accuracy {fmt_ci(metrics['accuracy'], ci.get('accuracy'))}, "
             f"macro-F1 {fmt_ci(metrics['macro_f1'], ci.get('macro_f1'))} (95% CI) on "
             f"{metrics['n_examples']} test examples; chance is {fmt(chance_level(k))} for "
             f"{k} classes present."]
    if includes_chance(metrics):
        lines += ["", "> **At chance.** The macro-F1 95% CI includes chance: this model is not "
                      "distinguishable from guessing on this test set (train longer, on more "
                      "images, or check the data)."]
    return lines


def report_markdown(metrics: Mapping, title: str,
                    extra_sections: Mapping[str, str] | None = None) -> str:
    """The report.md text: data summary, classification table with CIs, confusion, AUC, ECE."""
    names = metrics["class_names"]
    ci = metrics.get("ci95") or {}
    rec_ci = ci.get("recall", {})
    boot = metrics["bootstrap"]
    lines = [f"# {title}", "", *verdict_lines(metrics), "", "## Data", "",
             f"- examples: {metrics['n_examples']}, patients: {metrics['n_patients'] or 'unknown'}",
             "- support: " + ", ".join(f"{c} {metrics['per_class'][c]['support']}" for c in names)]
    if ci:
        lines.append(f"- 95% CIs: percentile bootstrap, {boot['n_resamples']} resamples of "
                     f"{boot['n_units']} {boot['unit']}s (seed {boot['seed']})")
    lines += [f"- warning: {w}" for w in metrics.get("warnings", [])]

    rows = [[c, fmt(m["precision"]), fmt_ci(m["recall"], rec_ci.get(c)), fmt(m["specificity"]),
             fmt(m["f1"]), str(m["support"])]
            for c, m in metrics["per_class"].items()]
    total = str(metrics["n_examples"])
    acc = fmt_ci(metrics["accuracy"], ci.get("accuracy"))
    rows.append(["**accuracy**", "", acc, "", "", total])
    for avg in ("macro", "weighted"):
        f1_ci = ci.get("macro_f1") if avg == "macro" else None
        rows.append([f"**{avg} avg**", fmt(metrics[f"{avg}_precision"]),
                     fmt(metrics[f"{avg}_recall"]), fmt(metrics[f"{avg}_specificity"]),
                     fmt_ci(metrics[f"{avg}_f1"], f1_ci), total])
    lines += ["", "## Classification report", ""]
    lines += markdown_table(["class", "precision (PPV)", "recall (sensitivity)", "specificity",
                              "F1", "support"], rows)

    cm = metrics["confusion_matrix"]
    lines += ["", "## Confusion matrix (rows: true, columns: predicted)", ""]
    lines += markdown_table(["true \\ pred", *names],
                             [[n, *map(str, r)] for n, r in zip(names, cm, strict=True)])

    auc_rows = [[c, fmt(metrics["per_class"][c]["roc_auc"])] for c in names]
    auc_rows.append(["**macro**", fmt_ci(metrics["roc_auc_macro"], ci.get("roc_auc_macro"))])
    lines += ["", "## ROC-AUC (one-vs-rest)", ""] + markdown_table(["class", "ROC-AUC"], auc_rows)
    lines += ["", "## Calibration", "",
              f"Expected calibration error ({DEFAULT_BINS} equal-width bins on the max "
              f"probability): {fmt(metrics['ece'], 4)}"]
    for heading, body in (extra_sections or {}).items():
        lines += ["", f"## {heading}", "", body.rstrip()]
    return "\n".join(lines) + "\n"
