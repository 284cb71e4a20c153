"""Open a bundle folder: validated manifest, verified files, text embeddings and class list."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vlm_export.core import manifest as mf
from vlm_export.core.errors import BundleError

log = logging.getLogger(__name__)


def _core_files(manifest: dict[str, Any]) -> tuple[str, str, str]:
    return manifest["engine"]["onnx"], manifest["text"]["embeddings"], manifest["labels"]["file"]


def _load_embeddings(path: Path, shape: list[int]) -> np.ndarray:
    try:
        embeddings = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise BundleError(f"{path.name} is not a readable .npy array ({exc})") from None
    if embeddings.ndim != 2 or list(embeddings.shape) != [int(v) for v in shape]:
        raise BundleError(
            f"{path.name} has shape {list(embeddings.shape)}, manifest says {list(shape)}"
        )
    if not np.issubdtype(embeddings.dtype, np.floating):
        raise BundleError(f"{path.name} has dtype {embeddings.dtype}, expected float32")
    return np.ascontiguousarray(embeddings, dtype=np.float32)


def _load_classes(path: Path) -> tuple[list[str], list[str], list[str]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        entries = data["classes"]
        names = [str(entry["name"]) for entry in entries]
        class_domains = [str(entry["domain"]) for entry in entries]
        domains = [str(domain) for domain in data["domains"]]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path.name} is not readable JSON ({exc})") from None
    except (KeyError, TypeError) as exc:
        raise BundleError(f"{path.name} is malformed (missing or wrong field: {exc})") from None
    unknown = sorted(set(class_domains) - set(domains))
    if unknown:
        raise BundleError(f"{path.name} names classes in undeclared domains: {', '.join(unknown)}")
    return names, class_domains, domains


@dataclass
class Bundle:
    """A validated bundle: manifest, class names and domains, text embeddings [C, E] float32."""

    path: Path
    manifest: dict[str, Any]
    classes: list[str]
    class_domains: list[str]
    domains: list[str]
    text_embeddings: np.ndarray
    fingerprint: str

    @classmethod
    def open(cls, path: str | Path, verify: bool = True) -> Bundle:
        """Read and check a bundle folder; raise BundleError naming the first problem.

        The manifest passes ``validate_manifest`` and ``validate_runtime_contract`` (engine tensors
        consistent with batch size, preprocessing, classes and condensation).

        ``verify`` checks the size and sha256 of every file the manifest lists (catches truncated
        and tampered files; costs a read of the ONNX file). Logs a warning when
        the bundle holds random weights.
        """
        path = Path(path)
        manifest = mf.validate_runtime_contract(mf.read_manifest(path))
        listed = manifest["files"]
        unlisted = [name for name in _core_files(manifest) if name not in listed]
        if unlisted:
            raise BundleError(f"manifest does not list (and hash) {', '.join(unlisted)}")
        if verify:
            mf.verify_files(path, manifest)
        onnx_name, embeddings_name, classes_name = _core_files(manifest)
        if not (path / onnx_name).is_file():
            raise BundleError(f"bundle file missing: {onnx_name}")
        embeddings = _load_embeddings(path / embeddings_name, manifest["text"]["shape"])
        names, class_domains, domains = _load_classes(path / classes_name)
        if len(names) != embeddings.shape[0]:
            raise BundleError(
                f"{classes_name} has {len(names)} classes, {embeddings_name} has "
                f"{embeddings.shape[0]} rows"
            )
        bundle = cls(
            path=path,
            manifest=manifest,
            classes=names,
            class_domains=class_domains,
            domains=domains,
            text_embeddings=embeddings,
            fingerprint=mf.bundle_fingerprint(manifest),
        )
        if bundle.untrained:
            log.warning(bundle.untrained_message)
        return bundle

    @property
    def untrained(self) -> bool:
        """True when the model was exported from random (untrained) weights."""
        return bool(self.manifest["model"]["untrained"])

    @property
    def untrained_message(self) -> str:
        """The warning shown for an untrained bundle."""
        return (
            f"bundle {self.path} holds UNTRAINED (random) weights of "
            f"{self.manifest['model']['name']}: predictions are meaningless"
        )

    @property
    def method(self) -> str:
        """The method the bundle was exported for (zeroshot, tca, rail, tca+rail)."""
        return str(self.manifest["method"])

    @property
    def onnx_path(self) -> Path:
        """The image encoder's ONNX file."""
        return self.path / self.manifest["engine"]["onnx"]

    @property
    def num_classes(self) -> int:
        """Number of classes C."""
        return len(self.classes)

    def engine_io(self, kind: str) -> dict[str, dict[str, Any]]:
        """The engine's ``inputs`` or ``outputs`` records by name."""
        return {record["name"]: record for record in self.manifest["engine"][kind]}

    def domain_class_indices(self, domain: str) -> np.ndarray:
        """Indices of the classes of one domain; BundleError for an unknown domain."""
        if domain not in self.domains:
            raise BundleError(
                f"bundle has no domain {domain!r} (domains: {', '.join(self.domains)})"
            )
        return np.array(
            [i for i, name in enumerate(self.class_domains) if name == domain], dtype=np.int64
        )
