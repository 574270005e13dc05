"""Grad-CAM: every backbone names a layer of the expected size; the maps equal the `saliency`
package's GradCam on activations and gradients computed separately; Adebayo et al. (2018)
sanity (randomised weights change the map, an irrelevant region does not); ensemble member
and combined maps (the combined gradient checked against finite differences of the numpy
combiner); predict --gradcam writes one overlay PNG per image."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import saliency.core as saliency
from PIL import Image
from scipy.special import softmax
from scipy.stats import pearsonr, spearmanr

import backbones
from backbones.cpu_ops import max_pool
from backbones.gradcam import (
    features_and_logits,
    gradcam,
    gradcam_maps,
    linear_map,
    normalise,
    upsample,
)
from data_pipeline.preprocess import PreprocessConfig, preprocess
from data_pipeline.synthetic import generate_phantoms
from ensembles.bundle import Bundle, load_bundle
from ensembles.combine.groups import plan
from ensembles.combine.rules import rule_combiner
from ensembles.inference import files as inference_files
from ensembles.report.overlay import MIN_DISPLAY, bundle_overlays, overlay_names, render
from ensembles.report.saliency import ensemble_gradcam
from experiments import predict

# Feature-map side at the Keras input sizes (and 64 px for the custom CNNs).
LAYER_SIDE = {"resnet18": (224, 7), "resnet34": (224, 7), "resnet50": (224, 7),
              "resnet101": (224, 7), "vgg16": (224, 7), "vgg19": (224, 7),
              "densenet121": (224, 7), "xception": (299, 10), "inception_v3": (299, 8),
              "simple_cnn": (64, 16), "complex_cnn": (64, 4), "cnn16": (64, 1),
              "cnn_bn3x2": (64, 8)}


def test_every_backbone_is_covered_here():
    assert sorted(LAYER_SIDE) == backbones.names()


@pytest.mark.parametrize("name", [
    n if backbones.is_custom_cnn(n) else pytest.param(n, marks=pytest.mark.slow)
    for n in sorted(LAYER_SIDE)])
def test_every_backbone_names_a_layer_of_the_expected_size(name):
    size, side = LAYER_SIDE[name]
    layer = backbones.gradcam_layer(name)
    model = backbones.create(name, num_classes=3)
    x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    maps, chosen, logits, features = jax.eval_shape(
        lambda v, x: gradcam_maps(model, v, x, jnp.full(2, -1), layer), variables, x)
    assert maps.shape == (2, side, side) and features.shape[:3] == (2, side, side)
    assert logits.shape == (2, 3) and chosen.shape == (2,)


def test_an_unknown_layer_is_refused():
    model = backbones.create("simple_cnn", num_classes=2, width=0.25)
    x = jnp.zeros((1, 16, 16, 1))
    v = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), x)
    with pytest.raises(ValueError, match="'block9' was called 0 times"):
        gradcam(model, v, x, layer="block9")


# -- equality with saliency.core.GradCam -------------------------------------------------
@pytest.fixture(scope="module")
def small():
    """simple_cnn with its flatten + Dense top (gradients vary over the map), 24 px."""
    model = backbones.create("simple_cnn", num_classes=3, width=0.25, head="imagenet")
    x = jax.random.uniform(jax.random.key(1), (6, 24, 24, 1))
    return model, jax.jit(functools.partial(model.init, train=False))(jax.random.key(3), x), x


def _reference_call(model, variables):
    """saliency's call_model_function: the last block's output and the class logit's
    gradient, computed without backbones.gradcam (captured conv output, ReLU and pool by
    hand, the head module applied on its own)."""
    head = backbones.Head("imagenet", 3, imagenet_flatten=True, imagenet_hidden=(128,))

    def call(x, call_model_args=None, expected_keys=None):
        _, state = model.apply(variables, jnp.asarray(x), train=False,
                               capture_intermediates=True)
        conv = state["intermediates"]["block2_conv1"]["__call__"][0]
        a = max_pool(nn.relu(conv), (2, 2), strides=(2, 2), padding="VALID")
        score = lambda a: head.apply({"params": variables["params"]["head"]}, a,  # noqa: E731
                                     train=False)[:, call_model_args["class"]].sum()
        return {saliency.CONVOLUTION_LAYER_VALUES: np.asarray(a),
                saliency.CONVOLUTION_OUTPUT_GRADIENTS: np.asarray(jax.grad(score)(a))}

    return call


@pytest.mark.parametrize("cls", [1, 2])  # both maps positive almost everywhere (seed 3)
def test_maps_equal_saliency_gradcam(small, cls):
    model, variables, x = small
    mine = gradcam(model, variables, x, cls, layer=backbones.gradcam_layer("simple_cnn"))
    call = _reference_call(model, variables)
    ref = np.stack([saliency.GradCam().GetMask(np.asarray(im), call, {"class": cls},
                                               should_resize=False, three_dims=False)
                    for im in x])
    assert mine.maps.shape == ref.shape == (6, 6, 6)
    assert (ref > 0).mean() > 0.5                      # a map with something in it
    np.testing.assert_allclose(mine.maps, ref, rtol=1e-4, atol=1e-6 * ref.max())
    proba = softmax(np.asarray(model.apply(variables, x, train=False)), axis=1)[:, cls]
    np.testing.assert_allclose(mine.probability, proba, rtol=1e-5)
    assert mine.class_index.tolist() == [cls] * 6


def test_default_class_is_the_prediction(small):
    model, variables, x = small
    got = gradcam(model, variables, x, layer="head")
    logits = np.asarray(model.apply(variables, x, train=False))
    assert got.class_index.tolist() == logits.argmax(1).tolist()
    per = gradcam(model, variables, x, np.asarray(got.class_index), layer="head")
    np.testing.assert_allclose(got.maps, per.maps, rtol=1e-6)
    with pytest.raises(ValueError, match="class_index"):
        gradcam(model, variables, x, 3, layer="head")


def test_upsample_and_normalise():
    maps = jnp.array([[[0.0, 2.0], [1.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    big = normalise(upsample(maps, (8, 8)))
    assert big.shape == (2, 8, 8)
    assert float(big[0].max()) == 1.0 and float(big[0].min()) == 0.0
    assert float(jnp.abs(big[1]).max()) == 0.0
    assert float(big[0, 0, 7]) > float(big[0, 7, 7])    # the 2.0 corner stays the hottest


# -- Adebayo et al. (2018) sanity --------------------------------------------------------
S = 32


def _blobs(n, seed, *, right=None):
    """Noise images; class 1 adds a bright 6x6 square somewhere in the left half, so the
    right half carries no class signal."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0.2, 0.1, (n, S, S, 1)).astype(np.float32)
    y = rng.integers(0, 2, n)
    boxes = rng.integers(2, [S - 8, S // 2 - 8], size=(n, 2))
    for i, (r, c) in enumerate(boxes):
        x[i, r:r + 6, c:c + 6] += 0.8 * y[i]
    return x, y, boxes


@pytest.fixture(scope="module")
def trained():
    """simple_cnn (global-pool head) trained for a few seconds on the blobs: accuracy 1.0."""
    model = backbones.create("simple_cnn", num_classes=2, width=0.25, head="linear")
    x, y, _ = _blobs(512, 0)
    params = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), x[:2])[
        "params"]
    tx = optax.adam(1e-2)

    @jax.jit
    def step(p, opt, xb, yb):
        def loss(p):
            z = model.apply({"params": p}, xb, train=False)
            return optax.softmax_cross_entropy_with_integer_labels(z, yb).mean()
        g = jax.grad(loss)(p)
        u, opt = tx.update(g, opt, p)
        return optax.apply_updates(p, u), opt

    opt = tx.init(params)
    for _ in range(4):
        for i in range(0, len(x), 32):
            params, opt = step(params, opt, x[i:i + 32], y[i:i + 32])
    xt, yt, boxes = _blobs(48, 1)
    assert (np.asarray(model.apply({"params": params}, xt, train=False)).argmax(1) == yt).all()
    return model, params, xt[yt == 1], boxes[yt == 1]


def _maps(model, params, images):
    got = gradcam(model, {"params": params}, images, 1, layer="head")
    return np.asarray(normalise(upsample(got.maps, (S, S))))


def _corr(fn, a, b):
    return float(np.mean([fn(u.ravel(), w.ravel())[0] for u, w in zip(a, b, strict=True)]))


@pytest.mark.slow
def test_maps_point_at_the_signal_and_fail_the_randomisation_test(trained):
    model, params, x, boxes = trained
    maps = _maps(model, params, x)
    peaks = [np.unravel_index(m.argmax(), m.shape) for m in maps]
    inside = [r - 2 <= pr < r + 8 and c - 2 <= pc < c + 8
              for (pr, pc), (r, c) in zip(peaks, boxes, strict=True)]
    assert np.mean(inside) >= 0.8
    random_params = jax.jit(functools.partial(model.init, train=False))(
        jax.random.key(7), x[:1])["params"]
    assert _corr(spearmanr, maps, _maps(model, random_params, x)) < 0.5


@pytest.mark.slow
def test_an_irrelevant_region_leaves_the_map_and_a_relevant_one_does_not(trained):
    model, params, x, boxes = trained
    maps = _maps(model, params, x)
    rng = np.random.default_rng(5)
    irrelevant = x.copy()
    irrelevant[:, :, S // 2:] = rng.normal(0.2, 0.1, irrelevant[:, :, S // 2:].shape)
    assert _corr(pearsonr, maps, _maps(model, params, irrelevant)) > 0.95
    moved = x.copy()                                       # the square moves 10 rows
    for i, (r, c) in enumerate(boxes):
        moved[i, :, :S // 2] = rng.normal(0.2, 0.1, moved[i, :, :S // 2].shape)
        r2 = (r + 10) % (S - 8)
        moved[i, r2:r2 + 6, c:c + 6] += 0.8
    assert _corr(pearsonr, maps, _maps(model, params, moved)) < 0.5


# -- ensembles ---------------------------------------------------------------------------
CLASSES = ("covid", "normal", "viral_pneumonia")


@functools.cache
def _bundle(strategy: str, seed: int = 0) -> Bundle:
    """A 3-class simple_cnn bundle with freshly initialised members (16 px, width 0.25)."""
    tasks, stacks = plan(strategy, CLASSES, np.repeat(np.arange(3), 4))
    combiner = rule_combiner(tasks)
    if strategy == "cascade":
        combiner.threshold_ = 0.4                   # the threshold mapping is differentiated
    options = {"head": "imagenet", "width": 0.25}
    variables = []
    for s in stacks:
        model = backbones.create("simple_cnn", num_classes=s.num_classes, **options)
        keys = jax.random.split(jax.random.key(seed + s.members[0]), s.size)
        variables.append(jax.jit(jax.vmap(lambda k, model=model: model.init(
            k, jnp.zeros((1, 16, 16, 1)), train=False)))(keys))
    return Bundle(None, "simple_cnn", CLASSES, PreprocessConfig(image_size=16), tasks,
                  stacks, variables, combiner, None, None, "ensemble", options)


def _images(n=5, seed=3):
    ph = generate_phantoms(n, image_size=24, classes=CLASSES, seed=seed)
    return list(ph["image"])


def _member(bundle, m):
    """(model, variables) of member m."""
    for s, v in zip(bundle.groups, bundle.variables, strict=True):
        if m in s.members:
            i = s.members.index(m)
            model = backbones.create("simple_cnn", num_classes=s.num_classes,
                                     **bundle.model_options)
            return model, jax.tree.map(lambda a: a[i], v)
    raise AssertionError(m)


@functools.partial(jax.jit, static_argnames=("model", "col"))
def _logit_linear_map(model, v, x, col):
    """(logits, sum_k alpha_k A_k of logit `col`, before the ReLU)."""
    logits, a = features_and_logits(model, v, x, "head")
    g = jax.grad(lambda f: features_and_logits(model, v, x, "head", f)[0][:, col].sum())(a)
    return logits, linear_map(a, g)


def _logit_linear_maps(bundle, x):
    """Per member: (logits, [linear map of each output column])."""
    out = []
    for m in range(bundle.tasks.num_members):
        model, v = _member(bundle, m)
        cols = [_logit_linear_map(model, v, x, col) for col in range(model.num_classes)]
        out.append((np.asarray(cols[0][0], np.float64),
                    [np.asarray(c[1], np.float64) for c in cols]))
    return out


def _expected_gradient_map(bundle, x, decisions):
    """ReLU(sum over members and columns of dP(c)/dz * that logit's linear map), dP/dz by
    central finite differences of the numpy combiner."""
    members = _logit_linear_maps(bundle, x)
    logits = [z for z, _ in members]
    total = np.zeros(members[0][1][0].shape)
    rows = np.arange(len(x))
    eps = 1e-6
    for m, (z, cols) in enumerate(members):
        for col in range(z.shape[1]):
            def p_of(delta, m=m, col=col):
                zs = [w.copy() for w in logits]
                zs[m][:, col] += delta
                return bundle.combine([softmax(w, axis=1) for w in zs])[rows, decisions]
            d = (p_of(eps) - p_of(-eps)) / (2 * eps)
            total += d[:, None, None] * cols[col]
    return np.maximum(total, 0)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ova", "cascade"])
def test_combined_map_is_the_gradient_of_the_combined_probability(strategy):
    bundle = _bundle(strategy)
    x = np.stack([preprocess(im, bundle.preprocess) for im in _images()])
    cams = ensemble_gradcam(bundle, x)
    assert cams.method == "gradient"
    expected = _expected_gradient_map(bundle, jnp.asarray(x), cams.decisions)
    assert expected.max() > 0
    np.testing.assert_allclose(cams.combined, expected, rtol=2e-3, atol=2e-3 * expected.max())
    probs = [softmax(z, axis=1) for z, _ in _logit_linear_maps(bundle, jnp.asarray(x))]
    np.testing.assert_allclose(cams.proba, bundle.combine(probs), rtol=1e-5)
    assert cams.decisions.tolist() == bundle.decide(probs).tolist()


@pytest.mark.slow
@pytest.mark.parametrize("strategy, columns", [
    ("ova", [1, 1, 1]), ("ovo", [0, 0, 0]), ("cascade", [1, None]), ("single", [None])])
def test_member_maps_explain_each_members_own_class(strategy, columns):
    bundle = _bundle(strategy)
    x = np.stack([preprocess(im, bundle.preprocess) for im in _images()])
    cams = ensemble_gradcam(bundle, x)
    assert cams.member_maps.shape == (len(columns), 5, 4, 4)
    for m, col in enumerate(columns):
        model, v = _member(bundle, m)
        want = gradcam(model, v, x, col, layer="head")
        assert cams.member_classes[m].tolist() == np.asarray(want.class_index).tolist()
        np.testing.assert_allclose(cams.member_maps[m], want.maps, rtol=1e-5, atol=1e-8)


@pytest.mark.slow
def test_ovo_combined_map_weights_the_members_of_the_decided_class():
    bundle = _bundle("ovo")
    x = np.stack([preprocess(im, bundle.preprocess) for im in _images()])
    cams = ensemble_gradcam(bundle, x)
    assert cams.method == "weighted members"
    pairs = [(0, 1), (0, 2), (1, 2)]
    for b, c in enumerate(cams.decisions):
        acc, total = 0.0, 0.0
        for m, pair in enumerate(pairs):
            if c not in pair:
                continue
            model, v = _member(bundle, m)
            got = gradcam(model, v, x[b:b + 1], pair.index(c), layer="head")
            acc = acc + float(got.probability[0]) * np.asarray(got.maps[0])
            total += float(got.probability[0])
        np.testing.assert_allclose(cams.combined[b], acc / total, rtol=1e-5, atol=1e-9)


def test_single_combined_map_is_the_decided_class_map():
    bundle = _bundle("single")
    x = np.stack([preprocess(im, bundle.preprocess) for im in _images()])
    cams = ensemble_gradcam(bundle, x)
    model, v = _member(bundle, 0)
    want = gradcam(model, v, x, cams.decisions, layer="head")
    np.testing.assert_allclose(cams.combined, want.maps, rtol=1e-5, atol=1e-8)


def test_overlays_are_batched_and_drawn():
    bundle = _bundle("ova")
    images = _images(5)
    cams, overlays = bundle_overlays(bundle, images, batch_size=2)     # 2 + 2 + 1 padded
    whole = ensemble_gradcam(bundle, np.stack([preprocess(im, bundle.preprocess)
                                               for im in images]))
    np.testing.assert_allclose(cams.combined, whole.combined, rtol=1e-5, atol=1e-9)
    assert [o.shape for o in overlays] == [(MIN_DISPLAY, MIN_DISPLAY, 3)] * 5
    assert all(o.dtype == np.uint8 for o in overlays)
    # the text box (black, light gray antialiased text) in the corner, colour elsewhere
    corner = overlays[0][:12, :24].astype(int)
    assert (corner == 0).all(axis=-1).any() and (corner.min(axis=-1) > 150).any()
    assert (corner.max(axis=-1) == corner.min(axis=-1)).all()
    assert np.ptp(overlays[0][100:, :, 0].astype(int) - overlays[0][100:, :, 2]) > 50


def test_render_blends_the_colour_map_over_the_gray_image():
    gray = np.full((64, 64), 100, np.uint8)
    heat = np.zeros((64, 64))
    heat[40:, 40:] = 1.0
    out = render(gray, heat, "covid 0.93", alpha=0.5)
    assert out.shape == (64, 64, 3)
    # jet: 0 -> dark blue (0, 0, 127.5), 1 -> dark red (127.5, 0, 0); half over gray 100
    np.testing.assert_allclose(out[30, 50], [50, 50, 114], atol=1)
    np.testing.assert_allclose(out[50, 50], [114, 50, 50], atol=1)
    assert out[:4, :4].max() == 0                       # the text box is black
    with pytest.raises(ValueError, match="differ in size"):
        render(gray, heat[:10], "x")


def test_overlay_names_never_collide():
    names = overlay_names(["a/x.png", "b/x.png", "c/y z.png", "d/y_z.png", "e/w.jpg"])
    assert len(set(names)) == 5
    assert names[4] == "w.png" and names[0].startswith("x-") and names[2].startswith("y_z-")
    assert overlay_names(["a/x.png", "b/x.png"]) == names[:2]          # stable


# -- predict --gradcam ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def ova_run(tiny_run):
    return tiny_run("ova")


@pytest.fixture()
def folder(tmp_path):
    for i, im in enumerate(_images(4, seed=4)):
        (tmp_path / "in" / f"d{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(im[..., 0]).save(tmp_path / "in" / f"d{i % 2}" / f"x{i // 2}.png")
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    return tmp_path / "in"


@pytest.mark.slow
def test_predict_writes_one_overlay_per_image(ova_run, folder, tmp_path, capsys):
    out = tmp_path / "cams"
    assert predict.main(["--run", str(ova_run), str(folder), "--gradcam", str(out),
                         "--csv", str(tmp_path / "p.csv"), "--batch-size", "3"]) == 0
    pngs = sorted(p.name for p in out.iterdir())
    assert len(pngs) == 4 and all(p.endswith(".png") for p in pngs)
    assert {p.split("-")[0] for p in pngs} == {"x0", "x1"}            # stems kept, hashed
    for p in out.iterdir():
        with Image.open(p) as im:
            assert (im.size, im.mode) == ((MIN_DISPLAY, MIN_DISPLAY), "RGB")
    assert "4 Grad-CAM overlay(s)" in capsys.readouterr().err
    # the overlay equals the library's for that image
    bundle = load_bundle(ova_run)
    files, _ = inference_files.find_images([folder])
    images = [np.asarray(Image.open(f))[..., None] for f in files]
    _, overlays = bundle_overlays(bundle, images)
    name = overlay_names(files)[0]
    assert np.array_equal(np.asarray(Image.open(out / name)), overlays[0])


@pytest.mark.slow
def test_predict_gradcam_refuses_a_file_and_meta(ova_run, folder, tmp_path, capsys):
    blocker = tmp_path / "cams"
    blocker.write_text("a file")
    assert predict.main(["--run", str(ova_run), str(folder), "--gradcam", str(blocker)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --gradcam") and "not a folder" in err
    assert predict.main(["--run", str(ova_run), str(folder), "--gradcam",
                         str(tmp_path / "x"), "--meta"]) == 2
    assert "--meta" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
