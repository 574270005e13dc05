"""Lung masks: the U-Net, the segmenter (training on phantoms, Dice, bundle), `--lung-mask`
(shipped and auto masks) and `--normalization dataset` through training and predict."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from folder_fixtures import make_flat
from PIL import Image

from backbones import unet
from data_pipeline import load_dataset
from data_pipeline.array_cache import prepare_image
from data_pipeline.preprocess import PreprocessConfig, preprocess
from data_pipeline.splits import split_indices
from ensembles.bundle import BundleError, load_bundle
from ensembles.bundle.segmenter import SegmenterConfig, fit_to_image, load_segmenter
from ensembles.training.segmenter import dice, train_segmenter
from experiments import predict, segment
from experiments.ensemble_cli import main as ensemble_main

SEG = SegmenterConfig(image_size=32, width=8, levels=3, epochs=6, batch_size=16, lr=3e-3)


def _unet_params(width: int, levels: int) -> int:
    """Parameters of the U-Net counted by hand: 3x3 convs without bias + BN (scale, offset)."""
    def block(cin, cout):
        return 9 * cin * cout + 2 * cout + 9 * cout * cout + 2 * cout
    chans = [width * 2 ** i for i in range(levels)]
    total = block(1, chans[0]) + sum(block(chans[i - 1], chans[i]) for i in range(1, levels))
    for i in reversed(range(levels - 1)):
        total += 4 * chans[i + 1] * chans[i] + chans[i]        # 2x2 transposed conv + bias
        total += block(2 * chans[i], chans[i])
    return total + chans[0] + 1                                 # 1x1 logits conv + bias


def test_unet_shape_and_parameter_count():
    model = unet.create(width=4, levels=3)
    x = jnp.zeros((2, 32, 32, 1))
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))
    count = sum(a.size for a in jax.tree.leaves(variables["params"]))
    assert count == _unet_params(4, 3) == 7477
    assert jax.eval_shape(lambda v: model.apply(v, x), variables).shape == (2, 32, 32, 1)
    assert set(variables) == {"params", "batch_stats"}
    with pytest.raises(ValueError, match="divisible by 4"):
        model.init(jax.random.PRNGKey(0), jnp.zeros((1, 30, 30, 1)))


def test_dice_values():
    a = np.zeros((3, 4, 4), bool)
    b = a.copy()
    a[0, :2], b[0, :1] = True, True            # 8 vs 4 pixels, 4 shared: 2*4/12
    a[1, 0, 0] = True                          # one empty target: 0
    np.testing.assert_allclose(dice(a, b), [2 / 3, 0.0, 1.0])


def test_fit_to_image_undoes_the_padding():
    # a 32 x 48 image padded into 32 x 32: content rows 5..25 (21 rows), bars above and below
    prob = np.zeros((32, 32), np.uint8)
    prob[:5], prob[26:] = 255, 255          # "lung" only in the padding bars
    prob[5:26, :16] = 200                   # and in the content's left half
    mask = fit_to_image(prob, (32, 48))
    assert mask.shape == (32, 48, 1) and set(np.unique(mask)) == {0, 255}
    assert mask[:, :23].min() == 255 and mask[:, 25:].max() == 0


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds-cache")


@pytest.fixture(scope="module")
def phantoms(cache):
    return load_dataset("synthetic_cxr", count=200, image_size=32, cache_dir=cache)


@pytest.fixture(scope="module")
def trained(phantoms, tmp_path_factory, trains):
    out = tmp_path_factory.mktemp("seg") / "run"
    segmenter, metrics = train_segmenter(phantoms, SEG, out=out, progress=False)
    return out, segmenter, metrics


@pytest.mark.slow
def test_segmenter_beats_trivial_masks(phantoms, trained):
    out, segmenter, metrics = trained
    splits = split_indices(phantoms.labels, phantoms.patient_ids, recipe="70/15/15", seed=0)
    examples = [phantoms.source[int(i)] for i in range(len(phantoms))]
    masks = np.stack([e["mask"][..., 0] > 127 for e in examples])
    test = splits["test"]
    predicted = np.stack([m[..., 0] > 127 for m in
                          segmenter.masks([examples[i]["image"] for i in test])])
    ours = dice(predicted, masks[test]).mean()
    all_lung = dice(np.ones_like(masks[test]), masks[test]).mean()
    # the best constant mask, its threshold chosen on the test masks themselves (an upper
    # bound for any fixed mask)
    freq = masks[splits["train"]].mean(0)
    constant = max(dice(np.broadcast_to(freq >= t, masks[test].shape), masks[test]).mean()
                   for t in np.linspace(0.05, 0.95, 19))
    assert ours > 0.9 and ours > constant + 0.03 and ours > all_lung + 0.3, (
        ours, constant, all_lung)
    assert metrics["dice"] == pytest.approx(ours, abs=0.01)
    assert metrics["trivial"]["all_lung"] == pytest.approx(all_lung)
    assert metrics["test_images"] == len(test)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["dice"] == metrics["dice"] and len(saved["records"]) == SEG.epochs


@pytest.mark.slow
def test_segmenter_bundle_round_trip_and_refusals(phantoms, trained, tmp_path):
    out, segmenter, _ = trained
    images = [phantoms.source[i]["image"] for i in range(8)]
    loaded = load_segmenter(out)
    assert loaded.digest == segmenter.digest and loaded.config == SEG
    for a, b in zip(loaded.masks(images), segmenter.masks(images), strict=True):
        np.testing.assert_array_equal(a, b)
    # masks of another size map back to the image's geometry (the padding undone)
    wide = np.asarray(Image.fromarray(images[0][..., 0]).resize((48, 32)))[..., None]
    assert loaded.masks([wide])[0].shape == (32, 48, 1)

    changed = tmp_path / "changed"
    shutil.copytree(out, changed)
    victim = next(p for p in sorted((changed / "params").rglob("*")) if p.is_file())
    victim.write_bytes(victim.read_bytes() + b"x")
    with pytest.raises(BundleError, match="changed since it was saved"):
        load_segmenter(changed)
    with pytest.raises(BundleError, match="changed since this model was trained"):
        load_segmenter(out, "0" * 64)
    with pytest.raises(BundleError, match="cannot read config.json"):
        load_segmenter(tmp_path / "nowhere")


def test_segment_cli_refuses_a_dataset_without_masks(tmp_path, capsys):
    root = make_flat(tmp_path / "flat", {"normal": 4, "covid": 4})
    code = segment.main(["--dataset", "image_folder", "--data-dir", str(root), "--cache-dir",
                         str(tmp_path / "cache"), "--out", str(tmp_path / "seg"),
                         "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()   # the build's progress lines first
    assert code == 2 and sum(line.startswith("error:") for line in err) == 1
    assert err[-1].startswith("error: dataset image_folder ships no lung masks")
    assert not (tmp_path / "seg").exists()


def _argv(out, cache, *extra):
    return ["--backbone", "simple_cnn", "--count", "64", "--image-size", "32", "--width",
            "0.25", "--epochs", "1", "--batch-size", "8", "--n-bootstrap", "0",
            "--cache-dir", str(cache), "--out", str(out), "--no-progress", *extra]


@pytest.mark.slow
def test_auto_masks_train_and_predict_alike(trained, cache, tmp_path, capsys):
    seg_dir, segmenter, _ = trained
    run = tmp_path / "run"
    assert ensemble_main("single", "", _argv(run, cache, "--lung-mask", "auto", "--segmenter",
                                             str(seg_dir))) == 0
    section = json.loads((run / "config.json").read_text())["bundle"]
    assert section["segmenter"] == {"path": str(seg_dir.absolute()),
                                    "sha256": segmenter.digest}
    assert section["preprocess"]["lung_mask"] is True
    bundle = load_bundle(run)
    data = load_dataset("synthetic_cxr", count=64, image_size=32, cache_dir=cache)
    rows = np.arange(12)
    raw = [{"image": data.source[int(i)]["image"], "label": 0} for i in rows]
    # predict's decoded images (no masks) get the segmenter's masks, which are the ones the
    # training examples had (the dataset's cached maps) ...
    trained_on = segmenter.source(data.source)
    served = bundle.with_masks(raw)
    for i in rows:
        np.testing.assert_array_equal(served[int(i)]["mask"], trained_on[int(i)]["mask"])
        x = preprocess(served[int(i)]["image"], bundle.preprocess, served[int(i)]["mask"])
        shipped = data.source[int(i)]["mask"]
        assert not np.array_equal(served[int(i)]["mask"], shipped)   # predicted, not shipped
        assert x[served[int(i)]["mask"][..., 0] == 0].max() == 0     # zero outside the lung
    # ... so decoded images and the dataset's examples get the same probabilities
    p_raw = bundle.predict(raw, rows).proba
    p_data = bundle.predict(data.source, rows).proba
    np.testing.assert_allclose(p_raw, p_data, atol=1e-5)

    # refusals: one line, exit 2 -- a segmenter that moved, one that changed, a missing flag
    image = tmp_path / "x.png"
    Image.fromarray(raw[0]["image"][..., 0]).save(image)
    capsys.readouterr()
    moved = seg_dir.with_name("moved")
    seg_dir.rename(moved)
    try:
        assert predict.main(["--run", str(run), str(image)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "segmenter" in err and "cannot read" in err
    finally:
        moved.rename(seg_dir)
    config = seg_dir / "config.json"
    original = config.read_bytes()
    config.write_bytes(original + b"\n")
    try:
        assert predict.main(["--run", str(run), str(image)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "changed since this model was trained" in err
    finally:
        config.write_bytes(original)
    for extra in (["--lung-mask", "auto"], ["--lung-mask", "auto", "--segmenter",
                                            str(tmp_path / "none")]):
        assert ensemble_main("single", "", _argv(tmp_path / "bad", cache, *extra)) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and err.count("\n") == 0
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_shipped_masks_and_dataset_normalization(cache, tmp_path):
    run = tmp_path / "run"
    assert ensemble_main("single", "", _argv(run, cache, "--lung-mask", "--normalization",
                                             "dataset")) == 0
    section = json.loads((run / "config.json").read_text())["bundle"]["preprocess"]
    data = load_dataset("synthetic_cxr", count=64, image_size=32, cache_dir=cache)
    train = split_indices(data.labels, data.patient_ids, recipe="70/15/15", seed=0)["train"]
    host = PreprocessConfig(image_size=32, lung_mask=True)
    x = np.stack([prepare_image(data.source[int(i)]["image"], host, data.source[int(i)]["mask"])
                  for i in train]).astype(np.float64) / 255
    assert section["lung_mask"] is True and section["normalization"] == "dataset"
    np.testing.assert_allclose(section["mean"], [x.mean()], rtol=1e-9)
    np.testing.assert_allclose(section["std"], [x.std()], rtol=1e-9)
    # predict masks with the shipped masks and normalises with the saved mean/std: it gives
    # the test probabilities fit saved, and members fed by hand agree
    bundle = load_bundle(run)
    saved = np.load(run / "outputs.npz")
    p = bundle.predict(data.source, saved["test_index"])
    np.testing.assert_allclose(p.proba, saved["test_proba"], atol=1e-5)
    rows = saved["test_index"][:4]
    by_hand = np.stack([(prepare_image(data.source[int(i)]["image"], host,
                                       data.source[int(i)]["mask"]) / 255 - x.mean()) / x.std()
                        for i in rows]).astype(np.float32)
    probs, _, _ = bundle.member_outputs([{"image": by_hand, "label": np.zeros(4, np.int32),
                                          "index": rows}])
    np.testing.assert_allclose(bundle.combine(probs), p.proba[:4], atol=1e-5)
    # an image without its mask is refused in one line
    with pytest.raises(ValueError, match="no mask was given"):
        bundle.predict([{"image": data.source[0]["image"], "label": 0}], np.arange(1))
