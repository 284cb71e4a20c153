"""The shipped dataset lists: documented counts, no duplicates, ImageNet subsets on the right
ImageNet names, every dataset's template set and TCA preset present."""

from __future__ import annotations

import pytest

from vlm_export.export.presets import TCA_PRESETS
from vlm_export.runtime.datasets.registry import DATASETS, get_dataset
from vlm_export.runtime.text.templates import template_set_names


@pytest.mark.parametrize("name", list(DATASETS))
def test_class_lists_have_the_documented_count_and_no_duplicates(name: str) -> None:
    spec = DATASETS[name]
    classes = spec.classes
    assert len(classes) == spec.num_classes
    normal = [c.replace("_", " ").lower().strip() for c in classes]
    repeated = {c for c in normal if normal.count(c) > 1}
    # CLIP's ImageNet names repeat two (projectile/missile, sunglass/sunglasses); kept as CLIP has
    # them, told apart by their folders
    assert repeated == ({"missile", "sunglasses"} if len(classes) == 1000 else set())
    assert all(c.strip() for c in classes)
    if spec.folders is not None:
        assert len(spec.folders) == len(classes)
        assert len(set(spec.folders)) == len(spec.folders)


@pytest.mark.parametrize("name", list(DATASETS))
def test_every_dataset_has_its_templates_and_preset(name: str) -> None:
    spec = DATASETS[name]
    assert spec.templates in template_set_names()
    assert spec.tca_preset in TCA_PRESETS


@pytest.mark.parametrize("subset", ["imagenet_a", "imagenet_r"])
def test_imagenet_subsets_map_to_the_imagenet_names_of_their_synsets(subset: str) -> None:
    imagenet = get_dataset("imagenet")
    by_wnid = dict(zip(imagenet.folders, imagenet.classes, strict=True))
    spec = get_dataset(subset)
    assert spec.classes == [by_wnid[wnid] for wnid in spec.folders]
    assert len(set(spec.folders) - set(imagenet.folders)) == 0


def test_known_entries() -> None:
    imagenet = get_dataset("ImageNet")
    assert imagenet.folders[0] == "n01440764" and imagenet.classes[0] == "tench"
    assert imagenet.folders[-1] == "n15075141" and imagenet.classes[-1] == "toilet paper"
    assert "goldfish" in get_dataset("imagenet-r").classes
    assert get_dataset("imagenet_a").folders[0] == "n01498041"  # stingray
    assert get_dataset("imagenet_v2").folders[:2] == ["0", "1"]
    caltech = get_dataset("caltech101")
    assert "face" in caltech.classes and "BACKGROUND_Google" not in caltech.folders
    assert caltech.folders[caltech.classes.index("face")] == "Faces"
    assert get_dataset("sun397").folders[0] == "a/abbey"
    assert get_dataset("ucf101").classes[0] == "Apply_Eye_Makeup"
    assert get_dataset("stanford_cars").classes[0] == "2000 AM General Hummer SUV"


def test_unknown_dataset_is_one_line() -> None:
    with pytest.raises(Exception, match="unknown dataset 'imagenet-z'; choose from imagenet"):
        get_dataset("imagenet-z")


def test_aircraft_variants_are_the_official_100_in_label_order() -> None:
    """FGVC Aircraft's variants.txt order (label i is line i): spot checks at both ends and at the
    names with '/' and spaces that a careless list would mangle."""
    names = get_dataset("fgvc_aircraft").classes
    assert names[:3] == ["707-320", "727-200", "737-200"]
    assert names[-3:] == ["Tu-134", "Tu-154", "Yak-42"]
    assert names.index("F-16A/B") == 72 and names.index("F/A-18") == 73
    assert "BAE 146-200" in names and "Embraer Legacy 600" in names
    assert get_dataset("fgvc_aircraft").folders is None
