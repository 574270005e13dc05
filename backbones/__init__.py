"""Flax backbones for chest X-ray classifiers, looked up by name.

    import backbones
    model = backbones.create("resnet50", num_classes=4, head="linear")
    variables = model.init({"params": key, "dropout": key}, x, train=False)

Importing the package imports every model module, which registers its names.
"""

from __future__ import annotations

import importlib

from backbones import cnns, resnet, vgg  # noqa: F401 - importing registers the models
from backbones.heads import HEADS, Head
from backbones.registry import create, get, names, register

# Modules still being written import only once they exist; any other import error surfaces.
for _module in ("densenet", "xception", "inception"):
    try:
        importlib.import_module(f"{__name__}.{_module}")
    except ModuleNotFoundError as error:
        if error.name != f"{__name__}.{_module}":
            raise

__all__ = ["HEADS", "Head", "create", "get", "names", "register"]
