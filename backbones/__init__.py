"""Flax backbones for chest X-ray classifiers, looked up by name.

    import backbones
    model = backbones.create("resnet50", num_classes=4, head="linear")
    variables = model.init({"params": key, "dropout": key}, x, train=False)

Importing the package imports every model module, which registers its names. ImageNet
weights: `load_pretrained` reads a Keras file, `weights.fetch` downloads a missing one.
"""

from __future__ import annotations

from backbones import (  # noqa: F401 - importing registers the models
    cnns,
    densenet,
    inception,
    resnet,
    vgg,
    weights,
    xception,
)
from backbones.heads import HEADS, Head
from backbones.pretrained import default_weights_path, load_pretrained, merge_pretrained
from backbones.registry import (
    create,
    get,
    gradcam_layer,
    is_custom_cnn,
    names,
    register,
    resolve_head,
)
from backbones.weights import WeightsDownloadError

__all__ = ["HEADS", "Head", "WeightsDownloadError", "create", "default_weights_path", "get",
           "gradcam_layer", "is_custom_cnn", "load_pretrained", "merge_pretrained", "names",
           "register", "resolve_head", "weights"]
