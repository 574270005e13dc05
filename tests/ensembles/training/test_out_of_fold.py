"""Out-of-fold members never train on the ids whose outputs they produce
(`fitting.out_of_fold_outputs`): the ids each fold's member loaders actually yield are
recorded and compared with the rows that fold predicts. Training is replaced by a recorder
that iterates the loaders it is given and returns untrained members, so the test is fast;
the outputs still come from the real predict path (`bundle.runtime`)."""

from __future__ import annotations

import jax
import numpy as np

from ensembles import make_config
from ensembles.training import build, fitting
from ensembles.training import members as members_lib

TINY = {"backbone": "simple_cnn", "image_size": 16, "count": 60, "width": 0.25,
        "epochs": 1, "batch_size": 8, "n_bootstrap": 0, "early_stopping_patience": 0,
        "progress": False, "classes": ("covid", "normal", "viral_pneumonia"),
        "meta": "logreg", "meta_folds": 2}


def _recording_train_stack(seen: dict):
    """A stand-in for members.train_group: records every id its training loaders yield
    (under the fold folder of its checkpoints) and returns freshly initialised members."""
    def train_group(stack, *, make_state, train_data, member_data=None, checkpoint_dir=None,
                    key, **_):
        fold = checkpoint_dir.parents[1].name
        loaders = [train_data] if member_data is None else member_data
        ids = [np.asarray(b["index"]).ravel() for loader in loaders for b in loader]
        seen.setdefault(fold, []).extend(ids)
        state = jax.jit(jax.vmap(lambda k: make_state(stack.num_classes, k)))(
            members_lib.member_keys(key, stack.members))
        variables = jax.tree.map(np.asarray, {"params": state.params,
                                              "batch_stats": state.batch_stats})
        return members_lib.TrainedGroup(stack, variables, [], np.zeros(stack.size, np.int64))
    return train_group


def test_out_of_fold_members_never_train_on_the_ids_they_predict(tmp_path, monkeypatch):
    config = make_config("ova", cache_dir=str(tmp_path / "cache"), **TINY)
    data = build.build_data(config)
    plan = fitting.plan_run(config, data)
    seen: dict[str, list[np.ndarray]] = {}
    monkeypatch.setattr(members_lib, "train_group", _recording_train_stack(seen))
    monkeypatch.setattr(fitting, "plot_curves", lambda *a, **k: None)   # no records to plot
    oof = fitting.out_of_fold_outputs(plan, tmp_path / "run")

    train = np.unique(data.train_indices)
    assert sorted(oof.indices.tolist()) == train.tolist()      # every training id once
    assert len(oof.members) == len(plan.tasks.names)
    assert all(len(p) == len(oof.indices) for p in oof.members)
    assert sorted(seen) == ["fold-0", "fold-1"]
    for f in range(2):
        predicted = oof.indices[oof.fold == f]
        trained_on = np.unique(np.concatenate(seen[f"fold-{f}"]))
        assert len(predicted) and len(trained_on)
        assert not np.isin(trained_on, predicted).any(), f"fold {f} trained on ids it predicts"
        assert not np.isin(oof.fold_train[f], predicted).any(), f
        assert set(trained_on) <= set(oof.fold_train[f].tolist())
