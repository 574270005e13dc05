"""Tests for data_pipeline.preprocess: normalisation numerics, resize geometry, equalisation,
lung masking, channels and config errors. Expected values are computed by hand from the
keras.applications preprocess_input definitions (keras is not installed)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from data_pipeline.preprocess import (
    PreprocessConfig,
    apply_lung_mask,
    dataset_mean_std,
    preprocess,
    resize,
)

# One row of known gray values; image_size equals the width so no resampling happens.
VALUES = np.array([0, 51, 100, 255], np.uint8)


def _row_image(values: np.ndarray = VALUES) -> np.ndarray:
    """A square image whose every row is `values` (so a same-size resize is the identity)."""
    return np.tile(values, (len(values), 1))[..., None]


def _run(normalization: str, channels: int = 3, **kw) -> np.ndarray:
    cfg = PreprocessConfig(image_size=len(VALUES), channels=channels,
                           normalization=normalization, **kw)
    out = preprocess(_row_image(), cfg)
    assert out.dtype == np.float32 and out.shape == (4, 4, channels)
    return out[0]  # [4 values, C]


def test_unit():
    np.testing.assert_allclose(_run("unit", 1)[:, 0], [0.0, 0.2, 100 / 255, 1.0], rtol=1e-6)


def test_caffe_is_bgr_minus_imagenet_means():
    out = _run("caffe")
    # gray: B = G = R = v, so BGR order only decides which mean each channel loses
    np.testing.assert_allclose(out[2], [100 - 103.939, 100 - 116.779, 100 - 123.68], atol=1e-4)
    np.testing.assert_allclose(out[0], [-103.939, -116.779, -123.68], atol=1e-4)
    np.testing.assert_allclose(out[3], [151.061, 138.221, 131.32], atol=1e-4)


def test_caffe_channel_order_on_distinct_channels():
    from data_pipeline.preprocess import normalize
    rgb = np.array([[[10.0, 20.0, 30.0]]], np.float32)  # R, G, B
    out = normalize(rgb, PreprocessConfig(channels=3, normalization="caffe"))
    np.testing.assert_allclose(out[0, 0], [30 - 103.939, 20 - 116.779, 10 - 123.68], atol=1e-4)


def test_tf():
    np.testing.assert_allclose(_run("tf")[:, 1], [-1.0, -0.6, 100 / 127.5 - 1, 1.0], atol=1e-6)


def test_torch():
    out = _run("torch")
    np.testing.assert_allclose(out[3], [2.2489083, 2.4285714, 2.64], atol=1e-5)
    np.testing.assert_allclose(out[1], [(0.2 - 0.485) / 0.229, (0.2 - 0.456) / 0.224,
                                        (0.2 - 0.406) / 0.225], atol=1e-5)
    np.testing.assert_allclose(out[0], [-2.1179039, -2.0357143, -1.8044444], atol=1e-5)


def test_dataset_mean_std():
    out = _run("dataset", 1, mean=0.5, std=0.25)[:, 0]
    np.testing.assert_allclose(out, [-2.0, -1.2, (100 / 255 - 0.5) / 0.25, 2.0], atol=1e-5)
    three = _run("dataset", 3, mean=(0.5, 0.4, 0.3), std=(0.25, 0.5, 1.0))
    np.testing.assert_allclose(three[1], [-1.2, -0.4, -0.1], atol=1e-5)


def test_xray():
    np.testing.assert_allclose(_run("xray", 1)[:, 0], [-1024.0, -614.4, 100 / 255 * 2048 - 1024,
                                                       1024.0], atol=1e-3)


def test_dataset_mean_std_helper_matches_numpy():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (8, 8, 1), dtype=np.uint8) for _ in range(3)]
    cfg = PreprocessConfig(image_size=8, channels=3)
    mean, std = dataset_mean_std(images, cfg)
    pixels = np.stack(images).astype(np.float64) / 255
    np.testing.assert_allclose(mean, [pixels.mean()] * 3, rtol=1e-6)
    np.testing.assert_allclose(std, [pixels.std()] * 3, rtol=1e-6)
    ready = dataclasses.replace(cfg, normalization="dataset", mean=mean, std=std)
    out = np.stack([preprocess(i, ready) for i in images])
    np.testing.assert_allclose(out.mean(), 0.0, atol=1e-5)
    np.testing.assert_allclose(out.std(), 1.0, atol=1e-4)


def test_pad_keeps_aspect_and_centres_between_black_bars():
    wide = np.full((20, 40), 200.0, np.float32)  # 2:1 -> 16 x 8 inside a 16 x 16 square
    out = resize(wide, 16, "pad")
    assert out.shape == (16, 16)
    np.testing.assert_allclose(out[4:12], 200.0, atol=1e-3)
    assert not out[:4].any() and not out[12:].any()
    tall = resize(wide.T.copy(), 16, "pad")
    np.testing.assert_allclose(tall[:, 4:12], 200.0, atol=1e-3)
    assert not tall[:, :4].any() and not tall[:, 12:].any()


def test_crop_takes_centred_square():
    wide = np.zeros((20, 40), np.float32)
    wide[:, 10:30] = 255.0  # exactly the centred 20 x 20 square
    out = resize(wide, 10, "crop")
    assert out.shape == (10, 10)
    np.testing.assert_allclose(out, 255.0, atol=1e-3)
    # a left-to-right ramp stays a ramp: no squeeze of the aspect ratio
    ramp = np.tile(np.arange(40, dtype=np.float32), (20, 1))
    cropped = resize(ramp, 20, "crop")
    np.testing.assert_allclose(cropped[0], np.arange(10, 30), atol=1e-3)


def test_preprocess_pad_on_non_square_image_normalises_the_bars():
    image = np.full((10, 20, 1), 255, np.uint8)
    out = preprocess(image, PreprocessConfig(image_size=8, normalization="tf"))
    np.testing.assert_allclose(out[2:6, :, 0], 1.0, atol=1e-5)
    np.testing.assert_allclose(out[:2, :, 0], -1.0)  # black bars are value 0 before tf


def _low_contrast(size: int = 64) -> np.ndarray:
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:size, :size]
    texture = 110 + 8 * np.sin(xx / 3.0) * np.cos(yy / 5.0) + rng.normal(0, 1, (size, size))
    return np.clip(texture, 0, 255).astype(np.uint8)[..., None]


def _local_std(x: np.ndarray, block: int = 8) -> float:
    h, w = x.shape
    blocks = x.reshape(h // block, block, w // block, block)
    return float(blocks.std(axis=(1, 3)).mean())


@pytest.mark.parametrize("option", ["clahe", "local_equalize"])
def test_equalisation_raises_local_contrast_and_keeps_range(option):
    image = _low_contrast()
    plain = preprocess(image, PreprocessConfig(image_size=64))[..., 0]
    equalised = preprocess(image, PreprocessConfig(image_size=64, **{option: True}))[..., 0]
    assert _local_std(equalised) > 2 * _local_std(plain)
    assert equalised.min() >= 0.0 and equalised.max() <= 1.0


def test_lung_mask_zeroes_outside_and_keeps_inside():
    image = np.full((16, 16, 1), 180, np.uint8)
    mask = np.zeros((16, 16, 1), np.uint8)
    mask[4:12, 2:7] = 255
    out = preprocess(image, PreprocessConfig(image_size=16, lung_mask=True), mask)[..., 0]
    np.testing.assert_allclose(out[4:12, 2:7], 180 / 255, rtol=1e-6)
    assert out.sum() == pytest.approx(8 * 5 * 180 / 255, rel=1e-5)


def test_lung_mask_of_another_size_is_resized_nearest():
    image = np.full((8, 8), 50.0, np.float32)
    mask = np.zeros((4, 4), np.uint8)
    mask[:, :2] = 255  # left half
    out = apply_lung_mask(image, mask)
    np.testing.assert_array_equal(out[:, :4], 50.0)
    np.testing.assert_array_equal(out[:, 4:], 0.0)


def test_channels_repeat_gray():
    out = preprocess(_row_image(), PreprocessConfig(image_size=4, channels=3))
    assert out.shape == (4, 4, 3)
    np.testing.assert_array_equal(out[..., 0], out[..., 1])
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


@pytest.mark.parametrize("kwargs, message", [
    ({"channels": 2}, "channels must be 1 or 3"),
    ({"image_size": 0}, "image_size"),
    ({"resize": "stretch"}, "resize must be one of"),
    ({"normalization": "imagenet"}, "normalization must be one of"),
    ({"normalization": "caffe", "channels": 1}, "needs channels=3"),
    ({"normalization": "torch", "channels": 1}, "needs channels=3"),
    ({"normalization": "dataset"}, "needs mean and std"),
    ({"normalization": "dataset", "mean": (0.1, 0.2), "std": 0.2}, "one value per channel"),
    ({"normalization": "dataset", "mean": 0.1, "std": 0.0}, "std must be > 0"),
    ({"mean": 0.5, "std": 0.2}, "only used by normalization='dataset'"),
    ({"clahe": True, "local_equalize": True}, "exclusive"),
    ({"clahe_clip": 0.0}, "clahe_clip"),
])
def test_bad_config_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PreprocessConfig(**kwargs)


def test_bad_input_raises():
    cfg = PreprocessConfig(image_size=8)
    with pytest.raises(ValueError, match="uint8 array of shape HxWx1"):
        preprocess(np.zeros((8, 8, 1), np.float32), cfg)
    with pytest.raises(ValueError, match="uint8 array of shape HxWx1"):
        preprocess(np.zeros((8, 8, 3), np.uint8), cfg)
    with pytest.raises(ValueError, match="no mask was given"):
        preprocess(np.zeros((8, 8, 1), np.uint8), PreprocessConfig(image_size=8, lung_mask=True))
