"""Labelled image folders for RAIL on the device, matched to the bundle's label space.

A domain's images are class-per-folder: ``DIR/<class>/<images>``, each folder named after one of
that domain's classes in the bundle, exactly or in its prompt form ("_" and " " interchanged) when
that names a single class. Images are taken in file-name order, so "the first N shots" of a class
are the same on every device.

A data root (``learn``, ``eval``, ``eval-tta``: ``read_layout``) is class-per-folder for one
domain, ``ROOT/<class>/``, or holds one folder per domain, ``ROOT/<domain>/<class>/``, for several.
For the X-TAIL evaluation a domain's folder is either split as ``train/<class>/`` and
``test/<class>/``, or unsplit ``<class>/``: then the first ``shots`` images of each class train
and the rest test.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vlm_export.core.errors import UserError
from vlm_export.runtime.bundle import Bundle
from vlm_export.runtime.io.sources import IMAGE_EXTENSIONS, is_image_file

SPLIT_FOLDERS = ("train", "test")


class DatasetError(UserError):
    """A data folder that does not fit the bundle's classes or holds too few images."""


@dataclass(frozen=True)
class LabelledImages:
    """Image files with their global class indices (int64), in a fixed order."""

    paths: list[Path]
    labels: np.ndarray

    @property
    def classes(self) -> list[int]:
        """The distinct class indices, ascending."""
        return sorted({int(label) for label in self.labels})

    def __len__(self) -> int:
        return len(self.paths)


@dataclass(frozen=True)
class DomainData:
    """One domain of an X-TAIL evaluation: its training and test images."""

    name: str
    train: LabelledImages
    test: LabelledImages
    split: bool


@dataclass(frozen=True)
class Layout:
    """Where the domains' class folders lie under a data root."""

    root: Path
    domains: tuple[str, ...]  # the domains asked for
    folders: dict[str, Path]  # domain -> its folder (ROOT/DOMAIN); empty: ROOT is class-per-folder

    def describe(self) -> str:
        """The layout found, for a status line."""
        if self.folders:
            return f"layout ROOT/DOMAIN/CLASS: {len(self.folders)} domain folder(s) in {self.root}"
        return f"layout ROOT/CLASS: class folders in {self.root}"

    def folder(self, domain: str) -> Path:
        """The folder of ``domain``'s classes (or of its train/ and test/ split)."""
        if self.folders:
            if domain not in self.folders:
                raise DatasetError(f"no folder for domain {domain!r}: {self.root / domain}")
            return self.folders[domain]
        if len(self.domains) > 1:
            raise DatasetError(
                f"{self.root} holds no domain folder: several domains need "
                f"{self.root}/<domain>/<class>/ (class-per-folder is for one domain)"
            )
        return self.root


def read_layout(bundle: Bundle, root: Path, domains: Sequence[str]) -> Layout:
    """The layout of ``root`` for ``domains``: ROOT/DOMAIN/CLASS when it holds a folder named
    after one of them (and not after a class), else class-per-folder."""
    if not root.is_dir():
        raise DatasetError(f"data folder not found: {root}")
    classes = {prompt_form(name) for name in bundle.classes}
    folders = {
        name: root / name
        for name in domains
        if (root / name).is_dir() and prompt_form(name) not in classes
    }
    return Layout(root, tuple(domains), folders)


def image_files(folder: Path) -> list[Path]:
    """The image files directly in ``folder`` (not hidden), sorted by name."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and is_image_file(p))


def _subfolders(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise DatasetError(f"data folder not found: {folder}")
    found = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not found:
        raise DatasetError(f"{folder} has no class folders (layout: {folder}/<class>/<images>)")
    return found


def prompt_form(name: str) -> str:
    """A class or folder name with "_" read as " " (how folder names match class names)."""
    return name.replace("_", " ")


def class_index(bundle: Bundle, domain: str, indices: list[int], folder: Path) -> int:
    """The global index of the class that ``folder`` names among ``domain``'s ``indices``."""
    name = folder.name
    hits = [i for i in indices if bundle.classes[i] == name]
    if not hits:
        hits = [i for i in indices if prompt_form(bundle.classes[i]) == prompt_form(name)]
    if len(hits) > 1:
        names = ", ".join(repr(bundle.classes[i]) for i in hits)
        raise DatasetError(f"class folder {folder} matches several classes of {domain}: {names}")
    if not hits:
        shown = ", ".join(bundle.classes[i] for i in indices[:10])
        more = ", ..." if len(indices) > 10 else ""
        raise DatasetError(
            f"class folder {folder} is not a class of domain {domain!r} "
            f"(its classes: {shown}{more})"
        )
    return hits[0]


def class_folders(bundle: Bundle, domain: str, folder: Path) -> list[tuple[Path, int]]:
    """Every class folder of ``folder`` with its global class index (one folder per class)."""
    indices = [int(i) for i in bundle.domain_class_indices(domain)]
    matched = [(sub, class_index(bundle, domain, indices, sub)) for sub in _subfolders(folder)]
    seen: dict[int, Path] = {}
    for sub, index in matched:
        if index in seen:
            raise DatasetError(
                f"class folders {seen[index]} and {sub} are both class {bundle.classes[index]!r}"
            )
        seen[index] = sub
    return matched


def _images_of(folder: Path) -> list[Path]:
    paths = image_files(folder)
    if not paths:
        raise DatasetError(
            f"class folder {folder} has no images (extensions: {' '.join(IMAGE_EXTENSIONS)})"
        )
    return paths


def _first(paths: list[Path], shots: int, folder: Path) -> list[Path]:
    if shots and len(paths) < shots:
        raise DatasetError(
            f"class folder {folder} has {len(paths)} images, fewer than --shots {shots}"
        )
    return paths[:shots] if shots else paths


def _labelled(groups: Sequence[tuple[list[Path], int]]) -> LabelledImages:
    paths = [path for group, _ in groups for path in group]
    labels = np.array([index for group, index in groups for _ in group], dtype=np.int64)
    return LabelledImages(paths, labels)


def training_images(bundle: Bundle, domain: str, folder: Path, shots: int) -> LabelledImages:
    """The first ``shots`` images (0: all) of every class folder of ``folder``, class by class."""
    groups = [
        (_first(_images_of(sub), shots, sub), index)
        for sub, index in class_folders(bundle, domain, folder)
    ]
    return _labelled(groups)


def _split_layout(folder: Path, classes: set[str]) -> bool:
    """True when ``folder`` holds train/ and test/; refuses one without the other."""
    present = [name for name in SPLIT_FOLDERS if (folder / name).is_dir()]
    if len(present) == 1 and present[0] not in classes:
        missing = next(name for name in SPLIT_FOLDERS if name not in present)
        raise DatasetError(f"{folder} has a {present[0]}/ folder but no {missing}/ folder")
    return len(present) == 2


def domain_data(
    bundle: Bundle, layout: Layout, domain: str, shots: int, test_per_class: int | None
) -> DomainData:
    """Training and test images of one domain of ``layout`` (see the module doc for layouts).

    ``test_per_class`` keeps the first N test images of each class (None: all).
    """
    classes = {bundle.classes[i] for i in bundle.domain_class_indices(domain)}
    folder = layout.folder(domain)
    split = _split_layout(folder, classes)
    if split:
        train = training_images(bundle, domain, folder / "train", shots)
        test_groups = [
            (_images_of(sub)[:test_per_class], index)
            for sub, index in class_folders(bundle, domain, folder / "test")
        ]
    else:
        if not shots:
            raise DatasetError(f"{folder} has no train/test split: it needs --shots of 1 or more")
        train_groups, test_groups = [], []
        for sub, index in class_folders(bundle, domain, folder):
            images = _images_of(sub)
            train_groups.append((_first(images, shots, sub), index))
            test_groups.append((images[shots:][:test_per_class], index))
        train = _labelled(train_groups)
    test = _labelled(test_groups)
    if not len(test):
        raise DatasetError(
            f"domain {domain!r} has no test images: --shots {shots} takes all of {folder}"
        )
    return DomainData(domain, train, test, split)


@dataclass(frozen=True)
class LabelledEmbeddings:
    """Computed embeddings [N, E] float32 with global class indices (int64; -1: an ``unknown``
    example, targets 0 on every class), in a fixed order."""

    features: np.ndarray
    labels: np.ndarray

    @property
    def classes(self) -> list[int]:
        """The distinct class indices, ascending (no -1)."""
        return sorted({int(label) for label in self.labels if label >= 0})

    def known(self) -> LabelledEmbeddings:
        """Only the examples of a class."""
        keep = self.labels >= 0
        return LabelledEmbeddings(self.features[keep], self.labels[keep])

    def __len__(self) -> int:
        return len(self.labels)
