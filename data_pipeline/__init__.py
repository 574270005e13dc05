"""Datasets, splits, preprocessing and the Grain loader; `load_dataset` is the entry point."""

from data_pipeline.datasets import Dataset, load_dataset

__all__ = ["Dataset", "load_dataset"]
