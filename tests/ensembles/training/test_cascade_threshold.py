"""The cascade's thresholded variant tunes its stage-1 threshold on validation member outputs,
never on the test outputs it is scored on (`api._rule_variants`)."""

from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np

from ensembles import api
from ensembles.combine import rules as rules_lib
from ensembles.combine.tasks import make_tasks

CLASSES = ("covid", "normal", "viral_pneumonia")
TARGET = 0.9


def _outputs(rng, n: int, sick_low: float, sick_high: float, tasks):
    """Cascade member outputs (stage 1 [N, 2], stage 2 [N, 2]) whose sick examples' stage-1
    scores lie in [sick_low, sick_high]; healthy examples score low."""
    y = rng.integers(0, len(CLASSES), n)
    y[:3] = [0, 1, 2]
    sick = y != tasks.healthy
    s = np.where(sick, rng.uniform(sick_low, sick_high, n), rng.uniform(0.0, 0.2, n))
    q = rng.uniform(0.05, 0.95, n)
    return [np.stack([1 - s, s], 1), np.stack([1 - q, q], 1)], y


def test_cascade_threshold_is_tuned_on_validation_outputs():
    tasks = make_tasks("cascade", CLASSES)
    rng = np.random.default_rng(0)
    val_p, y_val = _outputs(rng, 60, 0.6, 0.95, tasks)     # validation: sick scores high
    test_p, y_test = _outputs(rng, 60, 0.25, 0.55, tasks)  # test: sick scores lower
    plan = SimpleNamespace(
        config=SimpleNamespace(ensemble=SimpleNamespace(
            strategy="cascade", target_sensitivity=TARGET, ovo_decision="votes")),
        tasks=tasks, data=SimpleNamespace(class_names=CLASSES))
    rule = rules_lib.rule_combiner(tasks).fit(val_p, y_val)
    (variant,) = api._rule_variants(plan, val_p, y_val, test_p, y_test,
                                    rule.predict_proba(test_p))
    threshold = float(re.search(r"t=([0-9.]+)\)", variant["name"]).group(1))

    on_val = rules_lib.rule_combiner(tasks, target_sensitivity=TARGET).fit(val_p, y_val)
    on_test = rules_lib.rule_combiner(tasks, target_sensitivity=TARGET).fit(test_p, y_test)
    assert abs(on_val.threshold_ - on_test.threshold_) > 0.05   # the case tells them apart
    assert threshold == round(on_val.threshold_, 3)
    assert threshold != round(on_test.threshold_, 3)
    expected = api._variant("x", y_test, on_val.predict_proba(test_p), on_val.predict(test_p),
                            CLASSES)
    assert variant["accuracy"] == expected["accuracy"]
    assert variant["macro_f1"] == expected["macro_f1"]
