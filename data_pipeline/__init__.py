"""Datasets, splits, preprocessing and the Grain loader; `load_dataset` is the entry point.
`DataError` (a ValueError) is how the package refuses the user's data or data settings."""

from data_pipeline.datasets import Dataset, load_dataset
from data_pipeline.image_source import DataError

__all__ = ["DataError", "Dataset", "load_dataset"]
