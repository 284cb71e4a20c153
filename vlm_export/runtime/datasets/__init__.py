"""The papers' datasets as data: class names, folder layouts, template sets and TCA presets."""

from vlm_export.runtime.datasets.registry import DATASETS, DatasetSpec, dataset_names, get_dataset

__all__ = ["DATASETS", "DatasetSpec", "dataset_names", "get_dataset"]
