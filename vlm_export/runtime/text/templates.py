"""Prompt template sets: CLIP's ImageNet ensembles, per-dataset sets, or a user's text file.

A template is a string with exactly one ``{}``, where the class name goes. The per-dataset sets
follow the released TDA code, which TCA builds on (github.com/kdiAAA/TDA, ``datasets/*.py``): those
are the templates behind the published TDA/TCA numbers. Where they differ from CoOp's one-template
choice ("a photo of a {}." for Caltech101, Stanford Cars, SUN397 and ImageNet), CoOp's choice is the
built-in set ``single``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from vlm_export.core.errors import UserError
from vlm_export.core.json_input import read_text

PLACEHOLDER = "{}"
MAX_TEMPLATE_FILE_BYTES = 1 << 20  # one template a line: CLIP's 80 ImageNet ones take 3 KB

# CLIP's 80 ImageNet prompt templates, in the order of OpenAI's CLIP notebook (open_clip's
# zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES, stored there as lambdas).
IMAGENET80: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

# The 7-template subset that CLIP's notebook recommends and Tip-Adapter/TDA use (open_clip's
# SIMPLE_IMAGENET_TEMPLATES).
IMAGENET7: tuple[str, ...] = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)

SINGLE: tuple[str, ...] = ("a photo of a {}.",)

# Dataset name -> templates, as in github.com/kdiAAA/TDA datasets/<name>.py (TCA reuses them).
_DATASETS: dict[str, tuple[str, ...]] = {
    "imagenet": IMAGENET7,
    "imagenet_a": IMAGENET7,
    "imagenet_v2": IMAGENET7,
    "imagenet_r": IMAGENET80,
    "imagenet_sketch": IMAGENET80,
    "caltech101": IMAGENET7,
    "dtd": ("{} texture.",),
    "eurosat": ("a centered satellite photo of {}.",),
    "fgvc_aircraft": ("a photo of a {}, a type of aircraft.",),
    "food101": ("a photo of {}, a type of food.",),
    "oxford_flowers": ("a photo of a {}, a type of flower.",),
    "oxford_pets": ("a photo of a {}, a type of pet.",),
    "stanford_cars": IMAGENET7,
    "sun397": IMAGENET7,
    "ucf101": ("a photo of a person doing {}.",),
}

BUILTIN_TEMPLATES: dict[str, tuple[str, ...]] = {
    "imagenet80": IMAGENET80,
    "imagenet7": IMAGENET7,
    "single": SINGLE,
    **_DATASETS,
}


class TemplateError(UserError):
    """A template set that is unknown, empty, unreadable, or has a template without one ``{}``."""


def template_set_names() -> list[str]:
    """Names of the built-in template sets, in a stable order."""
    return list(BUILTIN_TEMPLATES)


def fill_template(template: str, name: str) -> str:
    """Put ``name`` where the template's ``{}`` is (plain replacement, no str.format parsing)."""
    return template.replace(PLACEHOLDER, name)


def _check(template: str, where: str) -> None:
    count = template.count(PLACEHOLDER)
    if count != 1:
        raise TemplateError(
            f"{where}: template {template!r} must contain exactly one {PLACEHOLDER} (found {count})"
        )


def check_templates(templates: Sequence[str], source: str = "templates") -> tuple[str, ...]:
    """Return ``templates`` as a tuple; TemplateError if empty or one lacks exactly one ``{}``."""
    if isinstance(templates, str):
        raise TemplateError(f"{source}: expected a sequence of templates, got one string")
    if not templates:
        raise TemplateError(f"{source}: the template set is empty")
    for number, template in enumerate(templates, start=1):
        _check(template, f"{source} #{number}")
    return tuple(templates)


def _read_template_file(path: Path) -> tuple[str, ...]:
    text = read_text(path, MAX_TEMPLATE_FILE_BYTES, TemplateError, f"template file {path}")
    templates = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        _check(line, f"{path} line {number}")
        templates.append(line)
    if not templates:
        raise TemplateError(f"template file {path} holds no templates")
    return tuple(templates)


def load_templates(spec: str) -> tuple[str, ...]:
    """Return the templates named by ``spec``: a built-in set name, or a path to a text file.

    A file holds one template per line; blank lines and lines starting with '#' are skipped.
    Raise TemplateError (one line) for an unknown name, an empty set, or a template without
    exactly one ``{}``.
    """
    if spec in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[spec]
    path = Path(spec).expanduser()
    if path.is_file():
        return _read_template_file(path)
    if path.exists():
        raise TemplateError(f"template file {spec} is not a regular file")
    raise TemplateError(
        f"unknown template set {spec!r} and no such file; built-in sets: "
        f"{', '.join(template_set_names())}"
    )
