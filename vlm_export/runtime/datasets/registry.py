"""The evaluation datasets of the TCA paper (spec/tca.md 3.5), shipped as data.

Each dataset names its class list (CLIP's ImageNet names; CoOp's names for the ten cross-dataset
sets, as TPT, TDA and TCA use them), the folder name of each class in the dataset's usual layout,
its prompt template set (``runtime/text/templates.py``) and its TCA hyperparameter preset. The
lists live in ``data/*.json``; ``data/SOURCES.md`` says where each came from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

from vlm_export.core.errors import UserError

CROSS_DATASETS = (
    "caltech101",
    "dtd",
    "eurosat",
    "fgvc_aircraft",
    "food101",
    "oxford_flowers",
    "oxford_pets",
    "stanford_cars",
    "sun397",
    "ucf101",
)


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset: what a bundle and an evaluation need to know about it.

    ``folders[i]`` is the folder of ``classes[i]`` in a class-per-folder layout (None where the
    dataset has no such layout); ``split_file`` is CoOp's split file (``split_zhou_*.json``) that
    lists the test images of datasets without class folders; ``subdirs`` are the usual places of
    the images below the dataset's root folder; ``roots`` the usual names of that root folder
    below a data root (the names of CoOp's DATASETS.md first).
    """

    name: str
    title: str
    num_classes: int
    templates: str
    tca_preset: str
    split_file: str | None
    subdirs: tuple[str, ...]
    roots: tuple[str, ...]

    @property
    def classes(self) -> list[str]:
        """The class names, in label order."""
        return list(_classes(self.name))

    @property
    def folders(self) -> list[str] | None:
        """Each class's folder name in the usual class-per-folder layout, or None."""
        return _folders(self.name)


def _spec(
    name: str,
    title: str,
    count: int,
    images: tuple[str, ...],
    roots: tuple[str, ...],
    split: str | None = None,
) -> DatasetSpec:
    return DatasetSpec(name, title, count, name, name, split, images, (*roots, name))


# name, title, classes, image folders below the root, root folder names, CoOp split file
DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        _spec("imagenet", "ImageNet", 1000, ("val", "images/val"), ("imagenet",)),
        _spec("imagenet_a", "ImageNet-A", 200, ("imagenet-a",), ("imagenet-adversarial",)),
        _spec("imagenet_r", "ImageNet-R", 200, ("imagenet-r",), ("imagenet-rendition",)),
        _spec(
            "imagenet_v2",
            "ImageNet-V2",
            1000,
            ("imagenetv2-matched-frequency-format-val",),
            ("imagenetv2", "imagenet-v2"),
        ),
        _spec(
            "imagenet_sketch", "ImageNet-Sketch", 1000, ("images", "sketch"), ("imagenet-sketch",)
        ),
        _spec(
            "caltech101",
            "Caltech101",
            100,
            ("101_ObjectCategories",),
            ("caltech-101",),
            "split_zhou_Caltech101.json",
        ),
        _spec("dtd", "DTD", 47, ("images",), ("dtd",), "split_zhou_DescribableTextures.json"),
        _spec(
            "eurosat",
            "EuroSAT",
            10,
            ("2750", "EuroSAT_RGB"),
            ("eurosat",),
            "split_zhou_EuroSAT.json",
        ),
        _spec(
            "fgvc_aircraft",
            "FGVC Aircraft",
            100,
            ("images", "data/images"),
            ("fgvc_aircraft", "fgvc-aircraft-2013b"),
        ),
        _spec("food101", "Food101", 101, ("images",), ("food-101",), "split_zhou_Food101.json"),
        _spec(
            "oxford_flowers",
            "Flowers102",
            102,
            ("jpg",),
            ("oxford_flowers",),
            "split_zhou_OxfordFlowers.json",
        ),
        _spec(
            "oxford_pets",
            "Oxford Pets",
            37,
            ("images",),
            ("oxford_pets",),
            "split_zhou_OxfordPets.json",
        ),
        _spec(
            "stanford_cars",
            "Stanford Cars",
            196,
            (),
            ("stanford_cars",),
            "split_zhou_StanfordCars.json",
        ),
        _spec("sun397", "SUN397", 397, ("SUN397",), ("sun397",), "split_zhou_SUN397.json"),
        _spec(
            "ucf101", "UCF101", 101, ("UCF-101-midframes",), ("ucf101",), "split_zhou_UCF101.json"
        ),
    )
}


def find_dataset_root(spec: DatasetSpec, data_root: Path) -> Path | None:
    """The dataset's folder below ``data_root`` under one of its usual names, or None."""
    for name in dict.fromkeys(spec.roots):
        if (data_root / name).is_dir():
            return data_root / name
    return None


def dataset_names() -> list[str]:
    """Every shipped dataset's name."""
    return list(DATASETS)


def get_dataset(name: str) -> DatasetSpec:
    """The dataset called ``name`` (case and '-' tolerant); UserError listing the names."""
    key = name.strip().lower().replace("-", "_")
    if key not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    return DATASETS[key]


@cache
def _data(name: str) -> dict:
    path = resources.files("vlm_export.runtime.datasets") / "data" / f"{name}.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


@cache
def _classes(name: str) -> tuple[str, ...]:
    data = _data(name)
    if "classes" in data:
        return tuple(data["classes"])
    if "imagenet_indices" in data:
        names = _classes("imagenet")
        return tuple(names[i] for i in data["imagenet_indices"])
    return _classes("imagenet")  # ImageNet-V2 and -Sketch: ImageNet's classes


def _folders(name: str) -> list[str] | None:
    data = _data(name)
    if "folders" in data:
        return list(data["folders"])
    if name == "imagenet_sketch":
        return _folders("imagenet")
    if name == "imagenet_v2":
        return [str(i) for i in range(1000)]
    return None
