"""A bundle saved by an earlier version still loads and predicts as it did: a tiny cascade
(simple_cnn, 16 px, one epoch) written by main at e8b3e84, before ensembles/ was split into
rooms, with the probabilities and decisions that version gave on eight fixed phantoms."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from data_pipeline.synthetic import generate_phantoms
from ensembles import Ensemble
from ensembles.bundle import load_bundle

DATA = Path(__file__).resolve().parents[2] / "data"
OLD = DATA / "bundle-v1-main-e8b3e84"


def test_a_bundle_of_the_earlier_layout_loads_and_predicts_as_it_did(tmp_path):
    run = shutil.copytree(OLD, tmp_path / "run")          # loading must not need to write
    expected = np.load(DATA / "bundle-v1-main-e8b3e84.expected.npz")
    images = generate_phantoms(8, image_size=16, seed=0)["image"]
    bundle = load_bundle(run)
    assert bundle.tasks.strategy == "cascade" and [g.members for g in bundle.groups] == [
        (0,), (1,)]
    ens = Ensemble.load(run)
    assert ens.config.model.head == "imagenet"     # its "auto" head, resolved on load
    np.testing.assert_allclose(ens.predict_proba(images), expected["proba"], atol=1e-5)
    np.testing.assert_array_equal(ens.predict(images), expected["decisions"])
