"""ImageNet weights from the Keras applications' HDF5 files, mapped onto our Flax modules.

    loaded = load_pretrained("densenet121", include_top=False)      # trunk only
    variables = merge_pretrained(model.init(rngs, x, train=False), loaded)

Our Keras-mirroring modules (resnet50, vgg16, vgg19, densenet121, xception, inception_v3)
name every trunk submodule like the Keras layer and keep Keras's top (`fc1`, `fc2`,
`predictions`) under `head` (head="imagenet"), so the mapping is by layer name. Layers Keras
leaves unnamed (`conv2d_7`, `batch_normalization_7`: Xception's shortcuts, all of
InceptionV3) are renumbered in creation order, whatever counter offset the file was saved
with. Kernels already share Flax's layout (kh, kw, in, out); only separable convs' depthwise
kernels are reshaped. Files are the legacy Keras HDF5 format (root attribute `layer_names`,
per-layer `weight_names`) of Keras 2 (`kernel:0`) and Keras 3 (`kernel`). This module only
reads files; `backbones.weights` downloads and verifies missing ones into the cache folder
(`python -m backbones weights download NAME`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import warnings
from pathlib import Path
from typing import Any

import h5py
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from backbones.registry import create

Variables = dict[str, Any]

RELEASE = "https://storage.googleapis.com/tensorflow/keras-applications"
TOP_LAYERS = ("fc1", "fc2", "predictions")  # Keras's top; our modules keep it under "head"
GENERATED = ("conv2d", "batch_normalization")  # Keras's names for unnamed layers


@dataclasses.dataclass(frozen=True)
class KerasWeights:
    """Where Keras publishes a model's weights and what they look like."""

    folder: str           # release sub-folder
    image_size: int       # Keras's default input side (fixes VGG's flatten width)
    md5: tuple[str, str]  # official hashes (with top, without top), keras.applications
    first_conv: str       # the layer whose RGB kernel grayscale="sum" folds


KERAS: dict[str, KerasWeights] = {
    "resnet50": KerasWeights("resnet", 224, ("2cb95161c43110f7111970584f804107",
                                             "4d473c1dd8becc155b73f8504c6f6626"), "conv1_conv"),
    "vgg16": KerasWeights("vgg16", 224, ("64373286793e3c8b2b4e3219cbf3544b",
                                         "6d6bbae143d832006294945121d1f1fc"), "block1_conv1"),
    "vgg19": KerasWeights("vgg19", 224, ("cbe5617147190e668d6c5d5026f83318",
                                         "253f8cb515780f3b799900260a226db6"), "block1_conv1"),
    "densenet121": KerasWeights("densenet", 224, ("9d60b8095a5708f2dcce2bca79d332c7",
                                                  "30ee3e1110167f948a6b9946edeeb738"),
                                "conv1_conv"),
    "xception": KerasWeights("xception", 299, ("0a58e3b7378bc2990ea3b43d5981f1f6",
                                               "b0042744bf5b25fce3cb969f33bebb97"),
                             "block1_conv1"),
    "inception_v3": KerasWeights("inception_v3", 299, ("9a0d58056eeedaa3f26cb7ebd46da564",
                                                       "bcbd6486424b2319ff4ef7d526e38f63"),
                                 "conv2d"),
}

# Keras weight name -> (Flax collection, leaf path inside the layer's module).
_LEAVES: dict[str, tuple[str, tuple[str, ...]]] = {
    "kernel": ("params", ("kernel",)),
    "bias": ("params", ("bias",)),
    "gamma": ("params", ("scale",)),
    "beta": ("params", ("bias",)),
    "moving_mean": ("batch_stats", ("mean",)),
    "moving_variance": ("batch_stats", ("var",)),
    "depthwise_kernel": ("params", ("depthwise", "kernel")),
    "pointwise_kernel": ("params", ("pointwise", "kernel")),
}


def keras_file_name(name: str, include_top: bool) -> str:
    """The Keras release's file name, e.g. densenet121_weights_tf_dim_ordering_tf_kernels.h5."""
    keras_spec(name)
    return f"{name}_weights_tf_dim_ordering_tf_kernels{'' if include_top else '_notop'}.h5"


def weights_folder() -> Path:
    """The weights cache: ~/.cache/cxr-ensembles/weights, or $CXR_ENSEMBLES_WEIGHTS."""
    return Path(os.environ.get("CXR_ENSEMBLES_WEIGHTS") or Path.home() / ".cache" /
                "cxr-ensembles" / "weights")


def default_weights_path(name: str, include_top: bool) -> Path:
    """<weights_folder()>/<Keras file name>."""
    return weights_folder() / keras_file_name(name, include_top)


def load_pretrained(name: str, path: str | os.PathLike | None = None, *, include_top: bool,
                    grayscale: str = "repeat", image_size: int | None = None) -> Variables:
    """Read a Keras HDF5 weight file into {"params": ..., "batch_stats": ...} for `name`.

    Every tensor is checked against `backbones.create(name, num_classes=1000,
    head="imagenet")`; a file that does not match raises one ValueError listing the missing,
    unexpected and mis-shaped tensors (nothing half-loaded is returned). include_top=False
    returns the trunk only (a full file's top is dropped); merge it into any model with
    `merge_pretrained`. grayscale="sum" folds the first conv's RGB kernels into one channel
    for 1-channel inputs; "repeat" keeps 3 channels (preprocessing repeats the gray image).
    image_size (default Keras's 224 / 299) only matters for VGG's top, whose fc1 width
    depends on it. A file whose MD5 is not an official Keras hash loads with a warning.
    """
    spec = keras_spec(name)
    if grayscale not in ("repeat", "sum"):
        raise ValueError(f"grayscale must be 'repeat' or 'sum', got {grayscale!r}")
    path = Path(path) if path is not None else default_weights_path(name, include_top)
    if not path.is_file():
        top = " --include-top" if include_top else ""
        raise FileNotFoundError(
            f"{path} not found: download {keras_file_name(name, include_top)} from the official "
            f"Keras release {RELEASE}/{spec.folder}/ into {path.parent}, or fetch it into the "
            f"cache folder (CXR_ENSEMBLES_WEIGHTS) with `python -m backbones weights download "
            f"{name}{top}`")
    digest = file_md5(path)
    if digest not in spec.md5:
        warnings.warn(f"{path.name}: MD5 {digest} is not an official Keras {name} weight file "
                      f"({' / '.join(spec.md5)}); loading it anyway", stacklevel=2)

    expected = _expected_shapes(name, spec, include_top, grayscale, image_size)
    loaded: dict[tuple[str, ...], np.ndarray] = {}
    unexpected, misshaped, seen = [], [], set()
    for layer, weights in _read_keras_h5(path).items():
        for weight, array in weights.items():
            if weight not in _LEAVES:
                unexpected.append(f"{layer}/{weight}")
                continue
            collection, leaf = _LEAVES[weight]
            module = ("head", layer) if layer in TOP_LAYERS else (layer,)
            key = (collection, *module, *leaf)
            if key not in expected:
                if not (layer in TOP_LAYERS and not include_top):
                    unexpected.append(f"{layer}/{weight}")
                continue
            if weight == "depthwise_kernel":  # Keras (kh, kw, in, m) -> grouped (kh, kw, 1, in*m)
                array = array.reshape(*array.shape[:2], 1, -1)
            if layer == spec.first_conv and weight == "kernel" and grayscale == "sum":
                array = array.sum(axis=2, keepdims=True)
            seen.add(key)
            if array.shape != expected[key]:
                misshaped.append(f"{'/'.join(key)} {array.shape} != {expected[key]}")
                continue
            loaded[key] = array.astype(np.float32)
    missing = ["/".join(key) for key in expected if key not in seen]
    if missing or unexpected or misshaped:
        raise ValueError(
            f"{path} does not match {name} (include_top={include_top}, grayscale={grayscale!r}): "
            f"{_listing('missing', missing)}; {_listing('unexpected', unexpected)}; "
            f"{_listing('mis-shaped', misshaped)}")
    return traverse_util.unflatten_dict(loaded)


def merge_pretrained(variables: Variables, loaded: Variables) -> Variables:
    """`variables` with every leaf present in `loaded` replaced (the head usually stays fresh).

    Raises one ValueError listing loaded leaves the model lacks or whose shape differs.
    """
    flat = traverse_util.flatten_dict(dict(variables))
    unexpected, misshaped = [], []
    for key, array in traverse_util.flatten_dict(dict(loaded)).items():
        if key not in flat:
            unexpected.append("/".join(key))
        elif tuple(array.shape) != tuple(flat[key].shape):
            misshaped.append(f"{'/'.join(key)} {tuple(array.shape)} != {tuple(flat[key].shape)}")
        else:
            flat[key] = jnp.asarray(array, flat[key].dtype)
    if unexpected or misshaped:
        raise ValueError(f"pretrained weights do not fit the model: "
                         f"{_listing('unexpected', unexpected)}; "
                         f"{_listing('mis-shaped', misshaped)} (a 1-channel model needs "
                         f"grayscale='sum')")
    return traverse_util.unflatten_dict(flat)


def keras_spec(name: str) -> KerasWeights:
    try:
        return KERAS[name]
    except KeyError:
        raise ValueError(f"no Keras ImageNet weights for {name!r}; available: "
                         f"{', '.join(KERAS)}") from None


def file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _expected_shapes(name: str, spec: KerasWeights, include_top: bool, grayscale: str,
                     image_size: int | None) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flat {(collection, *path): shape} of the Keras-topped model, nothing materialised."""
    model = create(name, num_classes=1000, head="imagenet")
    side = image_size or spec.image_size
    x = jnp.zeros((1, side, side, 1 if grayscale == "sum" else 3))
    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    abstract = jax.eval_shape(lambda: model.init(rngs, x, train=False))
    flat = traverse_util.flatten_dict(dict(abstract))
    return {key: tuple(leaf.shape) for key, leaf in flat.items()
            if include_top or key[1] != "head"}


def _read_keras_h5(path: Path) -> dict[str, dict[str, np.ndarray]]:
    """{layer: {weight: array}} from a legacy Keras HDF5 file, generated names renumbered."""
    try:
        with h5py.File(path, "r") as file:
            root = file.get("model_weights", file)
            if "layer_names" not in root.attrs:
                kind = ("a Keras 3 .weights.h5 file (layers stored by class, not by name)"
                        if "layers" in file and "vars" in file else "not a Keras weight file")
                raise ValueError(f"{path}: {kind}; expected a legacy Keras HDF5 weight file "
                                 f"(root attribute 'layer_names')")
            tensors = {}
            for layer in map(_text, root.attrs["layer_names"]):
                group = root[layer]
                tensors[layer] = {
                    re.sub(r":\d+$", "", _text(weight)).rsplit("/", 1)[-1]: np.asarray(
                        group[_text(weight)]) for weight in group.attrs.get("weight_names", [])}
    except (OSError, KeyError) as error:
        raise ValueError(f"{path}: cannot read the Keras HDF5 file (truncated or corrupt?): "
                         f"{error}") from None
    return _renumber_generated(tensors)


def _renumber_generated(tensors: dict[str, dict[str, np.ndarray]]) -> dict[str, Any]:
    """conv2d_5, conv2d_6, ... (any offset, creation order) -> conv2d, conv2d_1, ..."""
    renamed = {}
    for prefix in GENERATED:
        pattern = re.compile(rf"{prefix}(?:_(\d+))?")
        layers = [layer for layer in tensors if pattern.fullmatch(layer)]
        layers.sort(key=lambda layer: int(pattern.fullmatch(layer).group(1) or 0))
        renamed.update({layer: prefix + (f"_{i}" if i else "") for i, layer in enumerate(layers)})
    return {renamed.get(layer, layer): weights for layer, weights in tensors.items()}


def _text(value: bytes | str) -> str:
    return value.decode("utf8") if isinstance(value, bytes) else str(value)


def _listing(what: str, items: list[str], limit: int = 6) -> str:
    shown = ", ".join(items[:limit]) + (f", ... (+{len(items) - limit})" if len(items) > limit
                                        else "")
    return f"{len(items)} {what}" + (f" [{shown}]" if items else "")
