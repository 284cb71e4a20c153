"""A new label space for a bundle, on the device: classes, domains, templates, text embeddings.

``vlm-edge classes`` writes it into the bundle (``runtime.text.bundle_classes``), ``vlm-edge run
--classes`` uses it for one run, ``Pipeline.set_classes`` takes it between two frames. The rows
are what ``vlm-export`` computes for the same classes and templates: the bundle's text engine
embeds every class name it has not embedded with these very templates before; rows of names the
bundle already holds, made with the same templates, are kept as they are.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from vlm_export.core.errors import UserError
from vlm_export.core.labels import Label
from vlm_export.runtime.bundle import Bundle
from vlm_export.runtime.text.templates import (
    check_templates,
    load_templates,
    template_set_names,
)

_DOMAIN_NAME = re.compile(r"[\w.-]+")

Progress = Callable[[int, int], None]


class ClassEmbedder(Protocol):
    """The text engine as this module uses it (``runtime.text.encoder.TextEncoder``)."""

    def embed_classes(
        self, class_names: Sequence[str], templates: Sequence[str], progress: Progress | None = None
    ) -> np.ndarray: ...


@dataclass(frozen=True)
class LabelSpace:
    """Labels (domain, name) row by row, their domains in order, text embeddings [C, E]."""

    labels: list[Label]
    domains: list[str]
    text_embeddings: np.ndarray
    templates: tuple[str, ...]
    template_spec: str
    embedded: int  # class names the text engine embedded (the others were kept)

    @property
    def names(self) -> list[str]:
        """Class names, row by row."""
        return [name for _, name in self.labels]


def choose_templates(bundle: Bundle, spec: str | None) -> tuple[tuple[str, ...], str]:
    """(templates, their name): ``spec`` (a built-in set or a file) if given, else the bundle's."""
    if spec is not None:
        return load_templates(spec), spec
    text = bundle.manifest["text"]
    recorded = text.get("template_strings")
    if isinstance(recorded, list) and recorded:
        return check_templates(recorded, f"bundle {bundle.path} templates"), str(text["templates"])
    if text.get("templates") in template_set_names():
        return load_templates(text["templates"]), text["templates"]
    raise UserError(
        f"bundle {bundle.path} does not record its templates ({text.get('templates')!r}): pass "
        "--templates NAME|FILE"
    )


def new_labels(
    bundle: Bundle, names: Sequence[str], domain: str | None = None
) -> tuple[list[Label], list[str]]:
    """The bundle's labels with ``names`` as the classes of ``domain`` (the others unchanged).

    Without ``domain`` the names replace the whole label space of a one-domain bundle (in its
    domain). A new domain comes last. UserError for a bundle of several domains without
    ``domain``, an ill-formed domain name, or more classes than the engine's capacity.
    """
    if domain is None:
        if len(bundle.domains) != 1:
            raise UserError(
                f"bundle {bundle.path} has domains {', '.join(bundle.domains)}: say which one "
                "the classes replace with --domain NAME"
            )
        domain = bundle.domains[0]
    if not _DOMAIN_NAME.fullmatch(domain):
        raise UserError(f"--domain name {domain!r} may hold only letters, digits, '_', '-', '.'")
    domains = [*bundle.domains, *([] if domain in bundle.domains else [domain])]
    labels: list[Label] = []
    for name in domains:
        if name == domain:
            labels += [(domain, str(n)) for n in names]
        else:
            labels += [label for label in bundle.labels if label[0] == name]
    bundle.check_capacity(len(labels))
    return labels, domains


def embed_label_space(
    bundle: Bundle,
    labels: list[Label],
    domains: list[str],
    templates: tuple[str, ...],
    template_spec: str,
    embedder: ClassEmbedder,
    progress: Progress | None = None,
) -> LabelSpace:
    """Text embeddings for ``labels``: kept rows for names the bundle embedded with the same
    templates, the text engine's for the others (in one batch)."""
    same = list(templates) == list(bundle.manifest["text"].get("template_strings") or [])
    rows: dict[str, np.ndarray] = {}
    if same:
        rows = {name: bundle.text_embeddings[i] for i, name in enumerate(bundle.classes)}
    missing = list(dict.fromkeys(name for _, name in labels if name not in rows))
    if missing:
        embedded = np.asarray(embedder.embed_classes(missing, templates, progress), np.float32)
        rows.update(zip(missing, embedded, strict=True))
    text = np.stack([rows[name] for _, name in labels]).astype(np.float32)
    return LabelSpace(labels, domains, text, templates, template_spec, len(missing))


def label_space_for(
    bundle: Bundle,
    names: Sequence[str],
    domain: str | None,
    templates: str | None,
    embedder: ClassEmbedder,
) -> LabelSpace:
    """The bundle's label space with ``names`` as the classes of ``domain`` (``new_labels``),
    embedded with ``templates`` (None: the bundle's own) by ``embedder``."""
    chosen, spec = choose_templates(bundle, templates)
    labels, domains = new_labels(bundle, names, domain)
    return embed_label_space(bundle, labels, domains, chosen, spec, embedder)


def label_space_meta(space: LabelSpace) -> dict[str, Any]:
    """The manifest's ``text`` fields that describe how ``space``'s rows were made."""
    return {
        "templates": space.template_spec,
        "num_templates": len(space.templates),
        "template_strings": list(space.templates),
    }
