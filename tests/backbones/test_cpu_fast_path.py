"""The CPU fast path (backbones/cpu_ops.py) computes what the plain ops compute: values,
gradients and a train step's updated parameters."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import backbones
from backbones import cpu_ops, layers, training
from backbones.training.parallel import EIGEN_CONV_OPTIONS

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU fast path")


def _conv(x, w, strides, padding):
    return lax.conv_general_dilated(x, w, strides, padding,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("size,kernel,strides,padding", [
    ((2, 3), 3, (1, 1), "SAME"),                 # ResNet50 conv5 at 64 px: 3x3 on 2x2
    ((1, 1), 3, (1, 1), "SAME"),
    ((5, 5), 7, (2, 2), ((3, 3), (3, 3))),       # a strided stem, explicit pads
])
def test_im2col_conv_matches_convolution(size, kernel, strides, padding):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, *size, 4)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(kernel, kernel, 4, 5)), jnp.float32)
    cot = jnp.asarray(rng.normal(size=_conv(x, w, strides, padding).shape), jnp.float32)

    def loss(conv):
        return lambda x, w: jnp.sum(cot * conv(x, w, strides, padding))

    np.testing.assert_allclose(jax.jit(cpu_ops.im2col_conv, static_argnums=(2, 3))(
                                   x, w, strides, padding),
                               _conv(x, w, strides, padding), rtol=1e-5, atol=1e-5)
    for fast, plain in zip(jax.jit(jax.grad(loss(cpu_ops.im2col_conv), (0, 1)))(x, w),
                           jax.jit(jax.grad(loss(_conv), (0, 1)))(x, w)):
        np.testing.assert_allclose(fast, plain, rtol=1e-5, atol=1e-5)


def test_conv_uses_im2col_only_where_the_kernel_exceeds_the_map():
    w = jnp.zeros((3, 3, 4, 5))
    dn = ("NHWC", "HWIO", "NHWC")

    def primitives(side):
        x = jnp.zeros((1, side, side, 4))
        jaxpr = jax.make_jaxpr(lambda x: cpu_ops.conv_general_dilated(
            x, w, (1, 1), "SAME", dimension_numbers=dn))(x)
        return {e.primitive.name for e in jaxpr.jaxpr.eqns}

    assert "dot_general" in primitives(2) and "conv_general_dilated" not in primitives(2)
    assert "conv_general_dilated" in primitives(3)


@pytest.mark.parametrize("shape,window,strides,padding", [
    ((2, 7, 6, 3), (2, 2), (2, 2), "VALID"),     # odd side: the last row is dropped
    ((2, 9, 9, 3), (3, 3), (2, 2), "VALID"),     # ResNet's overlapping stem pool
    ((2, 5, 5, 3), (3, 3), (2, 2), "SAME"),      # -inf padding
])
def test_max_pool_matches_flax_with_ties(shape, window, strides, padding):
    rng = np.random.default_rng(1)
    x = jnp.asarray(np.round(rng.normal(size=shape)), jnp.float32)  # many equal values
    plain = nn.max_pool(x, window, strides=strides, padding=padding)
    cot = jnp.asarray(rng.normal(size=plain.shape), jnp.float32)

    def loss(fast):
        return lambda x: jnp.sum(cot * cpu_ops.max_pool(x, window, strides, padding, fast=fast))

    np.testing.assert_array_equal(cpu_ops.max_pool(x, window, strides, padding, fast=True),
                                  plain)
    # select_and_scatter's rule: each window's gradient goes to its first maximum
    np.testing.assert_array_equal(jax.jit(jax.grad(loss(True)))(x),
                                  jax.jit(jax.grad(loss(False)))(x))


class _Tiny(nn.Module):
    """Each changed layer once: ResNet's stem pool, the 2x2 pool, a 3x3 conv on a 1x1 map."""

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        x = layers.conv(4, 3, name="conv1", dtype=jnp.float32)(x)                   # 8x8
        x = nn.relu(layers.batch_norm(train=train, name="bn1", dtype=jnp.float32,
                                      axis_name="batch")(x))
        x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        x = cpu_ops.max_pool(x, (3, 3), strides=(2, 2))                              # 4x4
        x = layers.max_pool_if_fits(nn.relu(layers.conv(6, 3, name="conv2",
                                                        dtype=jnp.float32)(x)))      # 2x2
        x = layers.max_pool_if_fits(x)                                               # 1x1
        x = layers.conv(8, 3, name="conv3", dtype=jnp.float32)(x)                    # im2col
        return nn.Dense(3, name="head")(x.mean((1, 2)))


@pytest.mark.slow
def test_train_step_matches_plain_path(monkeypatch):
    tx = training.make_optimizer(training.OptimConfig(optimizer="sgd", learning_rate=0.1))
    variables = jax.jit(_Tiny().init)(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))
    state = training.create_train_state(_Tiny(), tx, jax.random.PRNGKey(1), (1, 8, 8, 3),
                                        variables=variables)
    rng = np.random.default_rng(2)
    batch = {"image": rng.normal(size=(4, 8, 8, 3)).astype(np.float32),
             "label": np.array([0, 1, 2, 0], np.int32), "weight": np.ones(4, np.float32)}
    dp = training.data_parallel("shard_map", jax.devices()[:1])

    def one_step():
        new, metrics = dp.train(training.make_train_step())(dp.replicate(state), batch)
        return jax.device_get((new.params, new.batch_stats, metrics))

    fast = one_step()
    monkeypatch.setattr(cpu_ops, "on_cpu", lambda: False)
    plain = one_step()
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 fast, plain)


@pytest.mark.slow
def test_eigen_convolutions_are_the_cpu_default_and_train_like_ynnpack():
    """The engine compiles its CPU steps with XLA's Eigen convolutions (parallel.
    EIGEN_CONV_OPTIONS, 1.3-2.2x faster there); a BatchNorm CNN's train steps under them give
    YNNPACK's parameters, statistics and metrics within float tolerance."""
    assert training.data_parallel("shard_map").compiler_options == tuple(
        EIGEN_CONV_OPTIONS.items())
    net = backbones.create("cnn_bn3x2", num_classes=3, width=0.25)
    tx = training.make_optimizer(training.OptimConfig(optimizer="sgd", learning_rate=0.1))
    state = training.create_train_state(net, tx, jax.random.PRNGKey(1), (1, 16, 16, 1))
    rng = np.random.default_rng(2)
    batches = [{"image": rng.normal(size=(8, 16, 16, 1)).astype(np.float32),
                "label": rng.integers(0, 3, 8).astype(np.int32),
                "weight": np.ones(8, np.float32)} for _ in range(3)]

    def train(options):
        dp = training.data_parallel("shard_map", jax.devices()[:1], options)
        step, s = dp.train(training.make_train_step()), dp.replicate(state)
        for batch in batches:
            s, metrics = step(s, batch)
        return jax.device_get((s.params, s.batch_stats, metrics))

    eigen, ynnpack = train(None), train({})
    assert not np.allclose(jax.tree.leaves(eigen[0])[0],
                           jax.tree.leaves(state.params)[0])        # the steps moved them
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 eigen, ynnpack)
