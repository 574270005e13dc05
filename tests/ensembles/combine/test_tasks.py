"""ensembles.tasks: relabel tables, masks, class weights and trainability checks."""

from __future__ import annotations

import numpy as np
import pytest

from ensembles.combine.tasks import check_trainable, make_tasks

K4 = ("covid", "normal", "viral_pneumonia", "bacterial_pneumonia")
K3 = ("normal", "viral_pneumonia", "bacterial_pneumonia")


def test_single():
    t = make_tasks("single", K4)
    assert t.num_members == 1 and t.num_classes == (4,)
    assert t.table.tolist() == [[0, 1, 2, 3]]


@pytest.mark.parametrize("names", [K4, K3])
def test_ova_tables(names):
    t = make_tasks("ova", names)
    k = len(names)
    assert t.num_classes == (2,) * k
    assert t.table.tolist() == np.eye(k, dtype=int).tolist()
    assert t.names[0] == f"{names[0]}_vs_rest"


def test_ovo_tables_follow_sklearn_pair_order():
    t = make_tasks("ovo", K4)
    assert t.table.tolist() == [
        [0, 1, -1, -1], [0, -1, 1, -1], [0, -1, -1, 1],
        [-1, 0, 1, -1], [-1, 0, -1, 1], [-1, -1, 0, 1]]
    assert t.names[3] == "normal_vs_viral_pneumonia"
    t3 = make_tasks("ovo", K3)
    assert t3.table.tolist() == [[0, 1, -1], [0, -1, 1], [-1, 0, 1]]


def test_cascade_tables():
    t = make_tasks("cascade", K4)
    assert t.num_classes == (2, 3) and t.healthy == 1
    assert t.table.tolist() == [[1, 0, 1, 1], [0, -1, 1, 2]]
    t3 = make_tasks("cascade", K3)
    assert t3.table.tolist() == [[0, 1, 1], [-1, 0, 1]] and t3.num_classes == (2, 2)
    assert [g.tolist() for g in t.groups(0)] == [[1], [0, 2, 3]]


def test_member_labels_and_masks_from_the_table():
    t = make_tasks("ovo", K3)
    labels, mask = t.member_labels(np.array([0, 1, 2, 2]))
    assert mask.tolist() == [[True, True, False, False], [True, False, True, True],
                             [False, True, True, True]]
    assert labels.tolist() == [[0, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]


def test_class_weights_per_member():
    y = np.array([0] * 6 + [1] * 2 + [2] * 4 + [3] * 4)            # covid 6, normal 2, ...
    t = make_tasks("cascade", K4)
    w = t.class_weights(y)
    # stage 1: healthy 2 vs sick 14 -> 16/(2*2), 16/(2*14); stage 2: 14 sick over 3 classes
    np.testing.assert_allclose(w[0], [4.0, 16 / 28])
    np.testing.assert_allclose(w[1], [14 / 18, 14 / 12, 14 / 12])
    ova = make_tasks("ova", K4).class_weights(y)
    np.testing.assert_allclose(ova[1], [16 / 28, 4.0])


def test_errors_are_clear():
    with pytest.raises(ValueError, match="healthy class 'normal'"):
        make_tasks("cascade", ("covid", "viral_pneumonia", "bacterial_pneumonia"))
    with pytest.raises(ValueError, match="unknown strategy 'ecoc'"):
        make_tasks("ecoc", K4)
    with pytest.raises(ValueError, match="duplicate"):
        make_tasks("ova", ("covid", "covid"))
    with pytest.raises(ValueError, match="at least 2 sick"):
        make_tasks("cascade", ("covid", "normal"))
    with pytest.raises(ValueError, match="labels must lie"):
        make_tasks("ova", K3).member_labels(np.array([0, 3]))


def test_check_trainable():
    y = np.array([0] * 5 + [1] * 5 + [2] * 1 + [3] * 5)
    counts = check_trainable(make_tasks("ova", K4), y, min_per_class=1)
    assert counts["viral_pneumonia_vs_rest"] == [15, 1]
    with pytest.raises(ValueError, match="covid_vs_viral_pneumonia: viral_pneumonia has 1"):
        check_trainable(make_tasks("ovo", K4), y, min_per_class=2)
    missing = y[y != 0]                                              # no covid example at all
    with pytest.raises(ValueError, match="covid_vs_rest: covid has 0"):
        check_trainable(make_tasks("ova", K4), missing)
    with pytest.raises(ValueError, match="sick_type: covid has 0"):
        check_trainable(make_tasks("cascade", K4), missing)
