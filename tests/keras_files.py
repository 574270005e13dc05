"""Keras weight files written by the tests: a model's variables as Keras 2 saves them
(`layer/kernel:0`), for the weight import and download tests."""

from __future__ import annotations

import h5py
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

import backbones
from backbones import pretrained

KERAS_WEIGHT = {leaf: weight for weight, leaf in pretrained._LEAVES.items()}


def abstract_variables(name: str, size: int, channels: int = 3, **kwargs):
    model = backbones.create(name, **kwargs)
    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    x = jnp.zeros((1, size, size, channels))
    return model, jax.eval_shape(lambda: model.init(rngs, x, train=False))


def write_legacy_h5(path, variables, *, offset: int = 0, drop: tuple[str, ...] = ()):
    """Write `variables` as Keras 2 does (`layer/kernel:0`), generated names shifted by offset."""
    layers: dict[str, dict[str, np.ndarray]] = {}
    for key, array in traverse_util.flatten_dict(variables).items():
        collection, *module = key
        for leaf_len in (2, 1):  # separable convs: (depthwise|pointwise, kernel)
            leaf = tuple(module[-leaf_len:])
            if (collection, leaf) in KERAS_WEIGHT:
                break
        layer = module[-leaf_len - 1]
        array = np.asarray(array)
        if leaf == ("depthwise", "kernel"):
            array = array.reshape(*array.shape[:2], -1, 1)
        layers.setdefault(layer, {})[KERAS_WEIGHT[collection, leaf]] = array

    def keras_name(layer: str) -> str:
        for prefix in pretrained.GENERATED:
            if layer == prefix or layer.startswith(prefix + "_"):
                return f"{prefix}_{int(layer[len(prefix) + 1:] or 0) + offset}"
        return layer

    with h5py.File(path, "w") as file:
        names = [keras_name(layer) for layer in layers if layer not in drop]
        file.attrs["layer_names"] = [n.encode() for n in names]
        for layer, weights in layers.items():
            if layer in drop:
                continue
            group = file.create_group(keras_name(layer))
            weight_names = [f"{keras_name(layer)}/{w}:0" for w in weights]
            group.attrs["weight_names"] = [w.encode() for w in weight_names]
            for weight_name, array in zip(weight_names, weights.values()):
                group[weight_name] = array
    return path


def random_like(abstract, seed: int = 0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.uniform(0.5, 1.5, s.shape).astype(np.float32), abstract)
