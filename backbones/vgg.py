"""VGG16 and VGG19 with Keras's layer structure and layer names.

Blocks of 3x3 'same' convolutions with bias + ReLU, each block ending in a 2x2 max-pool
(block1_conv1 ... block5_conv3/4); head="imagenet" is Keras's top: flatten + fc1 4096 ReLU +
fc2 4096 ReLU + predictions (138,357,544 / 143,667,240 parameters at 224 px, 1000 classes).
Inputs need sides >= 32 px, as in Keras; `width` scales the conv channels for tests. VGG has
no BatchNorm, so `axis_name` is accepted and unused.
"""

from __future__ import annotations

from backbones.cnns import register_plain_cnn

MIN_SIZE = 32  # Keras's smallest accepted input side

# Keras VGG: conv channels per block, then flatten + fc1 4096 + fc2 4096 + predictions.
vgg16 = register_plain_cnn(
    "vgg16", ((64, 64), (128, 128), (256,) * 3, (512,) * 3, (512,) * 3),
    top_hidden=(4096, 4096), min_size=MIN_SIZE)
vgg19 = register_plain_cnn(
    "vgg19", ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
    top_hidden=(4096, 4096), min_size=MIN_SIZE)
