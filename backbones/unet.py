"""A small U-Net (Ronneberger et al. 2015) for lung-field segmentation.

`levels` resolutions: at each, two 3x3 'same' convolutions + BatchNorm + ReLU; 2x2 max-pools
going down, 2x2 stride-2 transposed convolutions coming up, the encoder's map of the same
resolution concatenated before the decoder's convolutions; a final 1x1 convolution gives one
logit per pixel. Channels double per level from `width`. The module returns logits (the loss
takes them for numerical stability); `probabilities` applies the sigmoid. Not a classifier,
so it is created by `create` here rather than through the backbone registry.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class UNet(nn.Module):
    """Input NHWC float [B, S, S, C] with S divisible by 2 ** (levels - 1); logits [B, S, S, 1]."""

    width: int = 16
    levels: int = 4

    def _block(self, x: jax.Array, features: int, train: bool, name: str) -> jax.Array:
        for j in (1, 2):
            x = nn.Conv(features, (3, 3), padding="SAME", use_bias=False,
                        name=f"{name}_conv{j}")(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9,
                             name=f"{name}_bn{j}")(x)
            x = nn.relu(x)
        return x

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        side = 2 ** (self.levels - 1)
        if x.ndim != 4 or x.shape[1] % side or x.shape[2] % side:
            raise ValueError(f"UNet with {self.levels} levels needs NHWC input with sides "
                             f"divisible by {side}, got shape {x.shape}")
        skips = []
        for level in range(self.levels):
            x = self._block(x, self.width * 2 ** level, train, f"down{level}")
            if level < self.levels - 1:
                skips.append(x)
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
        for level in reversed(range(self.levels - 1)):
            features = self.width * 2 ** level
            x = nn.ConvTranspose(features, (2, 2), strides=(2, 2), name=f"up{level}_tconv")(x)
            x = self._block(jnp.concatenate([x, skips[level]], axis=-1), features, train,
                            f"up{level}")
        return nn.Conv(1, (1, 1), name="logits")(x)


def create(*, width: int = 16, levels: int = 4) -> UNet:
    """A U-Net of `levels` resolutions, `width` channels at the first (doubling per level)."""
    if width < 1 or levels < 1:
        raise ValueError(f"UNet needs width >= 1 and levels >= 1, got {width}, {levels}")
    return UNet(width=width, levels=levels)


def probabilities(logits: jax.Array) -> jax.Array:
    """Per-pixel lung probability [B, S, S] from the U-Net's logits [B, S, S, 1]."""
    return jax.nn.sigmoid(logits[..., 0])
