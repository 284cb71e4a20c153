"""A labelled test set on disk, matched to a bundle's classes.

Three layouts are read:
- class per folder: ``ROOT/<class>/<images>`` (folder names are the bundle's class names, or with
  ``--dataset`` the dataset's folder names: ImageNet synsets, ImageNet-V2's indices, SUN397's
  ``a/abbey`` paths, ...), also below the dataset's usual image folder (``val/``, ``images/``);
- CoOp's split file (``split_zhou_<Name>.json``, as TPT, TDA and TCA prepare the ten cross-dataset
  sets): its ``test`` list of ``[path, label, class name]``;
- FGVC Aircraft's own ``images_variant_test.txt`` (variant names as the shipped list has them).
Dataset class names are matched to the bundle's by their prompt form (case, "_" and " " ignored),
except when the bundle holds exactly the dataset's list (``vlm-export --dataset``): then class i of
the dataset is class i of the bundle, which keeps CLIP's two pairs of same-named ImageNet classes
("missile", "sunglasses") apart as the papers' evaluations do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vlm_export.core.errors import UserError
from vlm_export.core.json_input import read_json, read_text
from vlm_export.runtime.bundle import Bundle
from vlm_export.runtime.datasets.registry import DatasetSpec
from vlm_export.runtime.rail.dataset import image_files

MAX_LIST_BYTES = 64 << 20  # a split or list file (CoOp's largest splits are about 10 MB)


class EvalSetError(UserError):
    """A test folder that does not fit the bundle or the dataset."""


@dataclass
class EvalSet:
    """Image files with the bundle's class index of each, plus what was left out and why."""

    paths: list[Path]
    labels: np.ndarray
    unknown: list[str] = field(default_factory=list)
    empty: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)


def joined(sets: list[EvalSet]) -> EvalSet:
    """One set of the images (and what was left out) of ``sets``, in their order."""
    if len(sets) == 1:
        return sets[0]
    return EvalSet(
        [path for test in sets for path in test.paths],
        np.concatenate([test.labels for test in sets]),
        sorted({name for test in sets for name in test.unknown}),
        sorted({name for test in sets for name in test.empty}),
    )


def normal_name(name: str) -> str:
    """A class name's prompt form for matching: '_' as ' ', case and outer spaces ignored."""
    return " ".join(name.replace("_", " ").split()).lower()


ClassKey = tuple[str, int | None]  # (class name, index in the dataset's list or None)
Pairs = list[tuple[ClassKey, Path | None]]


def _bundle_labels(bundle: Bundle, dataset: DatasetSpec | None) -> dict[object, int]:
    """Bundle label by class key: by the name's prompt form, and by dataset index when the
    bundle holds exactly the dataset's list."""
    labels: dict[object, int] = {}
    for i, name in enumerate(bundle.classes):
        labels.setdefault(normal_name(name), i)
    if dataset is not None and list(bundle.classes) == dataset.classes:
        labels.update({i: i for i in range(bundle.num_classes)})
    return labels


def load_test_set(
    bundle: Bundle, root: Path, dataset: DatasetSpec | None, ignore_unknown: bool = False
) -> EvalSet:
    """The test images under ``root`` with bundle labels (see the module doc for layouts).

    Classes the bundle does not have are a EvalSetError listing them, or with ``ignore_unknown``
    their images are left out and named in ``unknown``. Class folders without images are named
    in ``empty``. A set with no image at all is a EvalSetError.
    """
    if not root.is_dir():
        raise EvalSetError(f"data folder not found: {root}")
    if dataset is not None and dataset.split_file and (root / dataset.split_file).is_file():
        pairs = _split_file_pairs(root, dataset)
    elif dataset is not None and dataset.name == "fgvc_aircraft":
        pairs = _aircraft_pairs(root, dataset)
    else:
        pairs = _folder_pairs(root, dataset)
    labels_by_key = _bundle_labels(bundle, dataset)

    def label_of(key: ClassKey) -> int | None:
        name, index = key
        by_index = labels_by_key.get(index) if index is not None else None
        return by_index if by_index is not None else labels_by_key.get(normal_name(name))

    groups: dict[ClassKey, list[Path]] = {}
    for key, path in pairs:
        groups.setdefault(key, [])
        if path is not None:
            groups[key].append(path)
    unknown = sorted({key[0] for key in groups if label_of(key) is None})
    if unknown and not ignore_unknown:
        shown = ", ".join(name[:40] for name in unknown[:10]) + (", ..." * (len(unknown) > 10))
        raise EvalSetError(
            f"{len(unknown)} of {len(groups)} classes in {root} are not classes of the bundle "
            f"({shown}); add them on the device with `vlm-edge classes BUNDLE CLASSES_FILE` "
            "(the bundle's text engine embeds them), or pass --ignore-unknown"
        )
    empty = sorted(key[0] for key, files in groups.items() if not files)
    paths: list[Path] = []
    labels: list[int] = []
    for key, files in groups.items():
        label = label_of(key)
        if label is not None:
            paths += files
            labels += [label] * len(files)
    if not paths:
        raise EvalSetError(f"no test images found in {root} for the bundle's classes")
    return EvalSet(paths, np.asarray(labels, dtype=np.int64), unknown, empty)


def _image_dir(root: Path, dataset: DatasetSpec | None) -> Path:
    for sub in dataset.subdirs if dataset else ():
        if (root / sub).is_dir():
            return root / sub
    return root


def _folder_pairs(root: Path, dataset: DatasetSpec | None) -> Pairs:
    """(class name, image) for every image of a class-per-folder layout; (name, None) when a
    class folder is empty, so that it can be reported."""
    base = _image_dir(root, dataset)
    folders = dataset.folders if dataset else None
    if folders is None:
        subfolders = sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not subfolders:
            raise EvalSetError(f"{base} has no class folders (layout: {base}/<class>/<images>)")
        named: list[tuple[ClassKey, Path]] = [((p.name, None), p) for p in subfolders]
    else:
        classes = dataset.classes
        lowered = {p.name.lower(): p for p in base.iterdir() if p.is_dir()}
        named = []
        for index, (folder, name) in enumerate(zip(folders, classes, strict=True)):
            path = base / folder
            if not path.is_dir() and "/" not in folder:
                path = lowered.get(folder.lower(), path)
            if path.is_dir():
                named.append(((name, index), path))
        known = {path.resolve() for _, path in named}
        extra = sorted(
            p.name
            for p in base.iterdir()
            if p.is_dir()
            and not p.name.startswith(".")
            and p.resolve() not in known
            and "/" not in folders[0]
        )
        if not named:
            raise EvalSetError(
                f"{base} holds none of {dataset.title}'s class folders (e.g. {folders[0]}/)"
            )
        named += [((name, None), base / name) for name in extra]
    pairs: Pairs = []
    for key, folder in named:
        files = image_files(folder)
        pairs += [(key, path) for path in files] or [(key, None)]
    return pairs


def _split_file_pairs(root: Path, dataset: DatasetSpec) -> Pairs:
    """(class name, image) of the ``test`` list of CoOp's split file."""
    split = root / str(dataset.split_file)
    try:
        items = read_json(split, MAX_LIST_BYTES, EvalSetError)["test"]
        entries = [(str(path), str(name)) for path, _label, name in items]
    except (ValueError, KeyError, TypeError) as exc:
        raise EvalSetError(f"{split} is not a CoOp split file with a test list ({exc})") from None
    if not entries:
        raise EvalSetError(f"{split} lists no test images")
    base = next(
        (d for d in (_image_dir(root, dataset), root) if (d / entries[0][0]).is_file()), None
    )
    if base is None:
        raise EvalSetError(
            f"{split} lists {entries[0][0]}, which is neither below {_image_dir(root, dataset)} "
            f"nor {root}"
        )
    return [((name, None), base / path) for path, name in entries]


def _aircraft_pairs(root: Path, dataset: DatasetSpec) -> Pairs:
    """(variant, image) from FGVC Aircraft's ``images_variant_test.txt`` (``data/`` in the
    official archive); a variant that is not one of the 100 becomes an unknown class. Blank
    lines, CRLF and a byte order mark are fine; a file that is not UTF-8, a line without a
    variant, and a first listed image that is not there are EvalSetError."""
    data = root / "data" if (root / "data" / "images_variant_test.txt").is_file() else root
    listing = data / "images_variant_test.txt"
    if not listing.is_file():
        raise EvalSetError(f"{data} has no images_variant_test.txt (FGVC Aircraft's test list)")
    text = read_text(listing, MAX_LIST_BYTES, EvalSetError)  # a byte order mark is dropped
    index = {name: i for i, name in enumerate(dataset.classes)}
    pairs: Pairs = []
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split(maxsplit=1)  # any blank run separates the id from the variant
        if not fields:
            continue
        if len(fields) < 2:
            raise EvalSetError(
                f"{listing} line {number}: expected '<image id> <variant>', got {line.strip()!r}"
            )
        variant = fields[1].strip()
        pairs.append(((variant, index.get(variant)), data / "images" / f"{fields[0]}.jpg"))
    if not pairs:
        raise EvalSetError(f"{listing} lists no test images")
    first = pairs[0][1]
    if not first.is_file():
        raise EvalSetError(f"{listing} lists {first.name}, which is not in {first.parent}")
    return pairs
