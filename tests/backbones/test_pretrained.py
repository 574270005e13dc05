"""Keras ImageNet weight import: file checks, merging, and equality with Keras itself.

The first part needs no Keras: it writes legacy-format HDF5 files with h5py from a model's
own shapes. The second part builds each Keras application with
random weights -- every variable, BatchNorm moving statistics included, so a wrong mapping
cannot hide behind identity statistics -- saves it with Keras's own legacy HDF5 writer, and
checks that our Flax model computes the same pooled features and logits. keras is in the
test extra: without it these tests fail rather than skip.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import h5py
import jax
import numpy as np
import pytest
from flax import traverse_util
from keras_files import abstract_variables, random_like, write_legacy_h5

import backbones
from backbones import pretrained
from backbones.pretrained import default_weights_path, load_pretrained, merge_pretrained

# Largest |ours - Keras| over the largest |Keras| of each output. Measured with Keras 3.15.1 on
# CPU (float32): worst of the six models 4.5e-7 (see the printed diffs), so 1e-5 leaves float32
# reassociation margin while an epsilon bug (1e-3 vs 1.001e-5) against variances near 1e-3
# moves outputs by percents.
RTOL = 1e-5


@pytest.fixture(scope="module")
def xception_file(tmp_path_factory):
    """Random Xception weights (depthwise kernels, generated names at offset 7) with top."""
    _, abstract = abstract_variables("xception", 71, num_classes=1000, head="imagenet")
    variables = random_like(abstract)
    path = write_legacy_h5(tmp_path_factory.mktemp("w") / "xception.h5", variables, offset=7)
    return path, variables


def load_quietly(*args, **kwargs):
    with pytest.warns(UserWarning, match="not an official Keras"):
        return load_pretrained(*args, **kwargs)


# --- file handling, no Keras needed ---------------------------------------------------------

def test_default_path_and_missing_file_message(tmp_path, monkeypatch):
    monkeypatch.setenv("CXR_ENSEMBLES_WEIGHTS", str(tmp_path))
    path = default_weights_path("inception_v3", include_top=False)
    assert path == tmp_path / "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5"
    monkeypatch.delenv("CXR_ENSEMBLES_WEIGHTS")
    assert default_weights_path("vgg16", True).parent.parts[-3:] == (
        ".cache", "cxr-ensembles", "weights")
    monkeypatch.setenv("CXR_ENSEMBLES_WEIGHTS", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="keras-applications/inception_v3/"):
        load_pretrained("inception_v3", include_top=False)
    with pytest.raises(ValueError, match="no Keras ImageNet weights for 'resnet18'"):
        load_pretrained("resnet18", tmp_path / "x.h5", include_top=True)


def test_round_trip_maps_every_tensor(xception_file):
    path, variables = xception_file
    loaded = load_quietly("xception", path, include_top=True, image_size=71)
    flat, want = (traverse_util.flatten_dict(t) for t in (loaded, variables))
    assert flat.keys() == want.keys()
    for key in want:
        np.testing.assert_array_equal(flat[key], want[key], err_msg="/".join(key))
    # The official hashes are known; an arbitrary file only warns.
    assert pretrained.file_md5(path) not in pretrained.KERAS["xception"].md5


def test_notop_drops_the_head_and_merges_into_a_fresh_model(xception_file):
    path, variables = xception_file
    loaded = load_quietly("xception", path, include_top=False)
    assert "head" not in loaded["params"]
    _, fresh = abstract_variables("xception", 71, num_classes=4, head="dense1024")
    fresh = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), fresh)
    merged = merge_pretrained(fresh, loaded)
    np.testing.assert_array_equal(merged["params"]["block14_sepconv2"]["pointwise"]["kernel"],
                                  variables["params"]["block14_sepconv2"]["pointwise"]["kernel"])
    np.testing.assert_array_equal(merged["batch_stats"]["batch_normalization_3"]["var"],
                                  variables["batch_stats"]["batch_normalization_3"]["var"])
    assert not np.any(merged["params"]["head"]["hidden"]["kernel"])  # head stays fresh
    _, gray = abstract_variables("xception", 71, channels=1, num_classes=4)
    with pytest.raises(ValueError, match=r"mis-shaped \[params/block1_conv1/kernel"):
        merge_pretrained(gray, loaded)


def test_grayscale_sum_folds_the_first_conv(xception_file):
    path, variables = xception_file
    loaded = load_quietly("xception", path, include_top=False, grayscale="sum")
    kernel = variables["params"]["block1_conv1"]["kernel"]
    np.testing.assert_allclose(loaded["params"]["block1_conv1"]["kernel"],
                               kernel.sum(axis=2, keepdims=True), rtol=1e-6)
    with pytest.raises(ValueError, match="grayscale must be"):
        load_pretrained("xception", path, include_top=False, grayscale="mean")


def test_mismatched_file_lists_missing_unexpected_and_misshaped(tmp_path):
    _, abstract = abstract_variables("densenet121", 32, num_classes=1000, head="imagenet")
    variables = random_like(abstract)
    variables["params"]["conv1_conv"]["kernel"] = np.zeros((3, 3, 3, 64), np.float32)
    variables["params"]["extra_dense"] = {"kernel": np.zeros((2, 2), np.float32)}
    path = write_legacy_h5(tmp_path / "bad.h5", variables, drop=("conv5_block16_2_conv",))
    with pytest.warns(UserWarning), pytest.raises(ValueError) as error:
        load_pretrained("densenet121", path, include_top=True)
    message = str(error.value)
    assert "1 missing [params/conv5_block16_2_conv/kernel]" in message
    assert "1 unexpected [extra_dense/kernel]" in message
    assert "1 mis-shaped [params/conv1_conv/kernel (3, 3, 3, 64) != (7, 7, 3, 64)]" in message
    # A notop file cannot give a top.
    notop = write_legacy_h5(tmp_path / "notop.h5", random_like(abstract), drop=("predictions",))
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"2 missing \[params/head"):
        load_pretrained("densenet121", notop, include_top=True)


def test_truncated_or_foreign_files_raise_one_clear_error(xception_file, tmp_path):
    path, _ = xception_file
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="truncated or corrupt"):
        load_pretrained("xception", truncated, include_top=True)
    keras3 = tmp_path / "model.weights.h5"
    with h5py.File(keras3, "w") as file:
        file.create_group("layers")
        file.create_group("vars")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="Keras 3 .weights.h5"):
        load_pretrained("xception", keras3, include_top=True)


def test_generated_names_are_renumbered_in_creation_order():
    tensors = {"conv2d_12": {}, "conv2d_9": {}, "conv2d_10": {}, "batch_normalization_3": {},
               "block1_conv1": {}}
    assert list(pretrained._renumber_generated(tensors)) == [
        "conv2d_2", "conv2d", "conv2d_1", "batch_normalization", "block1_conv1"]


# --- equality with Keras ---------------------------------------------------------------------

# name -> (Keras constructor, input side, last trunk layer, preprocess_input mode)
KERAS_MODELS = {
    "resnet50": ("ResNet50", 32, "conv5_block3_out", "caffe"),
    "vgg16": ("VGG16", 32, "block5_pool", "caffe"),
    "vgg19": ("VGG19", 32, "block5_pool", "caffe"),
    "densenet121": ("DenseNet121", 32, "relu", "torch"),
    "xception": ("Xception", 71, "block14_sepconv2_act", "tf"),
    "inception_v3": ("InceptionV3", 75, "mixed10", "tf"),
}
PREPROCESS_MODULES = {"caffe": "resnet50", "tf": "xception", "torch": "densenet"}


def randomize(keras, keras_model, seed: int) -> None:
    """Every variable random; fan-in scaled kernels keep it finite. Moving variances are
    log-uniform in [1e-3, 2] so an epsilon bug (Keras uses 1e-3 or 1.001e-5) shows."""
    rng = np.random.default_rng(seed)
    for variable in keras_model.weights:
        shape, name = tuple(variable.shape), variable.path.rsplit("/", 1)[-1]
        if "kernel" in name:
            fan_in = np.prod(shape[:-1]) if name != "depthwise_kernel" else np.prod(shape[:2])
            value = rng.normal(0, np.sqrt(1.0 / fan_in), shape)
        elif name == "gamma":
            value = rng.uniform(0.5, 1.0, shape)
        elif name == "moving_variance":
            value = np.exp(rng.uniform(np.log(1e-3), np.log(2.0), shape))
        else:  # bias, beta, moving_mean
            value = rng.normal(0, 0.1, shape)
        variable.assign(value.astype(np.float32))
    # Small variances would blow activations up layer after layer: fold sqrt(variance) into
    # gamma, or without gamma (Inception) into the producing conv's output channels, so each
    # BatchNorm gains ~sqrt(var / (var + epsilon)) -- 0.71 instead of 1.0 at var 1e-3 under
    # epsilon 1e-3, a difference no tolerance could miss.
    producers = {}
    for layer in keras_model.layers:
        try:
            producers[id(layer.output)] = layer
        except (AttributeError, ValueError):
            pass
    for layer in keras_model.layers:
        if not isinstance(layer, keras.layers.BatchNormalization):
            continue
        root = np.sqrt(np.asarray(layer.moving_variance))
        if layer.scale:
            layer.gamma.assign(np.asarray(layer.gamma) * root)
        else:
            conv = producers[id(layer.input)]
            conv.kernel.assign(np.asarray(conv.kernel) * root)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(KERAS_MODELS))
def test_imported_model_equals_keras(name, tmp_path):
    import keras  # in the test extra: a missing or broken keras fails, not skips

    if keras.backend.backend() != "jax":
        pytest.skip(f"needs KERAS_BACKEND=jax, got {keras.backend.backend()}")
    from keras.src.legacy.saving.legacy_h5_format import save_weights_to_hdf5_group

    constructor, size, trunk_layer, _ = KERAS_MODELS[name]
    full = getattr(keras.applications, constructor)(
        weights=None, include_top=True, input_shape=(size, size, 3), classifier_activation=None)
    randomize(keras, full, seed=len(name))
    trunk = keras.Model(full.input, full.get_layer(trunk_layer).output)
    both = keras.Model(full.input, [trunk.output, full.output])
    files = {}
    for include_top, keras_model in ((True, full), (False, trunk)):
        files[include_top] = tmp_path / pretrained.keras_file_name(name, include_top)
        with h5py.File(files[include_top], "w") as file:
            save_weights_to_hdf5_group(file, keras_model)

    rng = np.random.default_rng(1)
    rgb = rng.normal(0, 1, (2, size, size, 3)).astype(np.float32)
    gray = rng.normal(0, 1, (2, size, size, 1)).astype(np.float32)
    feature_map, logits = both(np.concatenate([rgb, np.repeat(gray, 3, -1)]), training=False)
    want_features = np.asarray(feature_map).mean(axis=(1, 2))
    want_logits = np.asarray(logits)[:2]

    def infer(model):  # one compiled forward: eager dispatch of 100s of shapes is slower
        return jax.jit(lambda variables, x: model.apply(variables, x, train=False))

    top = load_quietly(name, files[True], include_top=True, image_size=size)
    got_logits = infer(backbones.create(name, num_classes=1000, head="imagenet"))(top, rgb)
    features = infer(backbones.create(name, num_classes=None, head="features"))
    notop = load_quietly(name, files[False], include_top=False)
    got_features = features(notop, rgb)
    summed = load_quietly(name, files[False], include_top=False, grayscale="sum")
    got_gray = features(summed, gray)

    pairs = {"logits": (got_logits, want_logits),
             "features": (got_features, want_features[:2]),
             "gray_sum_features": (got_gray, want_features[2:])}
    for what, (got, want) in pairs.items():  # max() below would skip a NaN not in first place
        assert np.isfinite(got).all() and np.isfinite(want).all(), what
    diffs = {what: float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())
             for what, (got, want) in pairs.items()}
    print(f"\n{name} max rel diff vs Keras {keras.__version__}: {diffs}; "
          f"|features| max {np.abs(want_features).max():.3g}, "
          f"|logits| max {np.abs(want_logits).max():.3g}")
    assert np.abs(want_features).max() > 1e-2  # a dead network would prove nothing
    assert np.std(want_logits) > 1e-2
    assert all(d <= RTOL for d in diffs.values()), diffs


@pytest.mark.parametrize("mode", list(PREPROCESS_MODULES))
def test_preprocess_presets_equal_keras_preprocess_input(mode):
    import keras

    from data_pipeline.preprocess import PreprocessConfig, normalize, preprocess

    keras_preprocess = getattr(keras.applications, PREPROCESS_MODULES[mode]).preprocess_input
    rng = np.random.default_rng(0)
    cfg = PreprocessConfig(image_size=24, channels=3, normalization=mode)
    rgb = rng.integers(0, 256, (24, 24, 3)).astype(np.float32)
    np.testing.assert_allclose(normalize(rgb, cfg), keras_preprocess(rgb.copy()), atol=1e-4)
    gray = rng.integers(0, 256, (24, 24, 1), dtype=np.uint8)
    want = keras_preprocess(np.repeat(gray, 3, -1).astype(np.float32))
    np.testing.assert_allclose(preprocess(gray, cfg), want, atol=1e-4)
