"""Chance level is 1 / the classes PRESENT in the evaluated labels, not the model's class count.

A 4-class model evaluated on data with 3 of its classes (cross-dataset evaluation) is judged
against 1/3: macro averages run over the classes present, so guessing among them scores 1/3.
"""

from __future__ import annotations

import numpy as np
import pytest

from ensembles.evaluate.assess import summary_line
from ensembles.evaluate.metrics import (
    chance_level,
    classes_present,
    evaluate_predictions,
    includes_chance,
)
from ensembles.report.markdown import report_markdown, verdict_lines

NAMES = ["covid", "normal", "viral_pneumonia", "bacterial_pneumonia"]

# metrics.json's top-level keys: the fix must not add, drop or rename any.
KEYS = {"class_names", "n_examples", "n_patients", "accuracy", "macro_precision",
        "weighted_precision", "macro_recall", "weighted_recall", "macro_specificity",
        "weighted_specificity", "macro_f1", "weighted_f1", "per_class", "confusion_matrix",
        "roc_auc_macro", "ece", "absent_classes", "warnings", "bootstrap", "ci95"}


def _three_of_four(n: int = 240, signal: float = 1.0, seed: int = 3, n_bootstrap: int = 0):
    """Metrics of a 4-class model on labels drawn from classes 0, 1, 2 only."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    logits = rng.normal(size=(n, 4))
    logits[np.arange(n), y] += signal
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    return evaluate_predictions(y, p, NAMES, n_bootstrap=n_bootstrap, seed=seed)


def test_chance_counts_the_classes_present_not_the_model_classes():
    m = _three_of_four()
    assert len(m["per_class"]) == 4 and m["absent_classes"] == ["bacterial_pneumonia"]
    assert classes_present(m) == 3
    assert chance_level(classes_present(m)) == pytest.approx(1 / 3)
    assert set(m) == KEYS                                  # metrics.json keys unchanged


def test_report_and_summary_say_chance_for_the_classes_present():
    m = _three_of_four(n_bootstrap=50)
    head = "\n".join(verdict_lines(m))
    assert "chance is 0.333 for 3 classes present." in head
    assert "0.250" not in head and "4 classes" not in head
    assert "chance is 0.333 for 3 classes present." in report_markdown(m, "Run")
    line = summary_line(m, "RUN/report.md")
    assert "chance 0.333 for 3 classes present;" in line
    assert "0.250" not in line and "4 classes" not in line


def test_all_classes_present_still_reads_one_over_k():
    rng = np.random.default_rng(0)
    y = np.arange(200) % 4
    p = rng.dirichlet(np.ones(4), size=200)
    m = evaluate_predictions(y, p, NAMES, n_bootstrap=0)
    assert classes_present(m) == 4
    assert "chance is 0.250 for 4 classes present." in "\n".join(verdict_lines(m))
    assert "chance 0.250 for 4 classes present;" in summary_line(m, "r.md")


@pytest.mark.parametrize("lower, at_chance", [(0.30, True), (1 / 3, True), (0.34, False)])
def test_includes_chance_compares_with_one_over_the_classes_present(lower, at_chance):
    """A macro-F1 CI from 0.30 is above 1/4 but reaches 1/3: at chance on 3 classes present."""
    m = _three_of_four(n_bootstrap=20)
    m["ci95"]["macro_f1"] = [lower, 0.6]
    assert includes_chance(m) is at_chance
    assert ("AT CHANCE" in summary_line(m, "r.md")) is at_chance
    assert ("**At chance.**" in "\n".join(verdict_lines(m))) is at_chance


@pytest.mark.parametrize("macro_f1, at_chance", [(0.30, True), (0.34, False)])
def test_includes_chance_without_a_ci_uses_the_point_value(macro_f1, at_chance):
    m = _three_of_four()
    assert m["ci95"] is None
    m["macro_f1"] = macro_f1
    assert includes_chance(m) is at_chance


def test_no_class_present_or_no_class_is_an_error():
    m = _three_of_four()
    for c in m["per_class"].values():
        c["support"] = 0
    with pytest.raises(ValueError, match="support"):
        classes_present(m)
    with pytest.raises(ValueError):
        chance_level(0)
