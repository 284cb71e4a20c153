"""Class names -> text embeddings on the device, with the bundle's text engine and tokenizer.

``TextEncoder.open(bundle)`` loads ``text_encoder.onnx`` (ONNX Runtime) or, with the TensorRT
backend, a text engine built for this GPU, and the bundle's vocabulary (sha256-checked).
``embed_classes`` gives what ``vlm-export`` writes to ``text_embeddings.npy`` for the same classes
and templates (same prompt filling, length-sorted batches cut to their longest prompt, float64
means): max abs difference <= 1e-5 in fp32 (tests/test_text_engine.py).
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from vlm_export.core import manifest as mf
from vlm_export.core.errors import BundleError, UserError
from vlm_export.runtime.engines.select import TEXT_ROLE, engines_of_role
from vlm_export.runtime.text.prompts import (
    Progress,
    build_prompts,
    check_classes,
    class_embeddings,
    embed_prompts,
    warn_truncated,
)
from vlm_export.runtime.text.templates import check_templates
from vlm_export.runtime.text.tokenizer import ClipTokenizer

BACKENDS = ("auto", "onnxruntime", "tensorrt")
TEXT_TENSORRT_MODULE = "vlm_export.runtime.text.tensorrt_text"


class NoTextEngineError(BundleError):
    """The bundle carries no text engine (exported with --no-text-encoder or by an old version)."""


class TextRunner(Protocol):
    """Runs the text engine: tokens [B, T] int64 -> L2-normalised embeddings [B, E] float32."""

    description: str
    max_batch: int

    def __call__(self, tokens: np.ndarray) -> np.ndarray: ...


def text_engine_section(bundle: Any) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """(bundle folder, manifest, its ``text_encoder`` section); NoTextEngineError if absent."""
    if isinstance(bundle, (str, Path)):
        folder, manifest = Path(bundle), mf.read_manifest(bundle)
    else:
        folder, manifest = Path(bundle.path), bundle.manifest
    section = manifest.get("text_encoder")
    if not isinstance(section, dict):
        raise NoTextEngineError(
            f"bundle {folder} has no text engine (exported with --no-text-encoder, by an older "
            "vlm-export, or for a model whose tokenizer the runtime cannot reproduce): re-export "
            "it without --no-text-encoder to change classes on the device"
        )
    return folder, manifest, section


class OnnxRuntimeTextRunner:
    """The text engine on ONNX Runtime (free batch and length axes)."""

    def __init__(self, path: Path, providers: Sequence[str] | None = None) -> None:
        from vlm_export.runtime.engines.backends.onnxruntime_backend import (
            choose_providers,
            import_onnxruntime,
            ort_errors,
        )

        ort = import_onnxruntime()
        options = ort.SessionOptions()
        options.log_severity_level = 3
        chosen = choose_providers(providers, ort.get_available_providers())
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "Specified provider", UserWarning)
                self.session = ort.InferenceSession(str(path), options, providers=chosen)
        except ort_errors(ort) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BundleError(f"ONNX Runtime cannot load {path.name}: {first}") from None
        self.description = "onnxruntime:" + "+".join(self.session.get_providers())
        self.max_batch = 256

    def __call__(self, tokens: np.ndarray) -> np.ndarray:
        return self.session.run([mf.TEXT_EMBEDDING_OUTPUT], {mf.TOKENS_INPUT: tokens})[0]


class TextEncoder:
    """The bundle's text engine and tokenizer: class names and templates -> embeddings [C, E]."""

    def __init__(self, runner: TextRunner, tokenizer: ClipTokenizer, context_length: int) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.context_length = context_length

    @classmethod
    def open(
        cls,
        bundle: Any,
        backend: str = "auto",
        providers: Sequence[str] | None = None,
    ) -> TextEncoder:
        """Open the text engine of ``bundle`` (a ``Bundle`` or its folder).

        ``backend``: ``onnxruntime`` (``providers`` as for the image engine), ``tensorrt`` (a
        text engine of the manifest built for this GPU), or ``auto``: TensorRT when the manifest
        lists a text engine that loads here, else ONNX Runtime. NoTextEngineError (one line) for
        a bundle without a text engine; TokenizerError for a vocabulary failing its sha256.
        """
        if backend not in BACKENDS:
            raise UserError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
        folder, manifest, section = text_engine_section(bundle)
        tokenizer = ClipTokenizer.from_bundle(bundle)
        context = int(section["context_length"])
        runner: TextRunner | None = None
        if backend == "tensorrt" or (backend == "auto" and not providers and _has_trt(manifest)):
            try:
                runner = importlib.import_module(TEXT_TENSORRT_MODULE).open_text_engine(
                    folder, manifest
                )
            except (ImportError, UserError, RuntimeError) as exc:
                if backend == "tensorrt":
                    raise UserError(f"the TensorRT text engine cannot be used: {exc}") from None
        if runner is None:
            name = section["onnx"]
            path = folder / name
            if name not in manifest["files"] or not path.is_file():
                raise BundleError(f"bundle file missing or unlisted: {name}")
            runner = OnnxRuntimeTextRunner(path, providers)
        return cls(runner, tokenizer, context)

    @property
    def description(self) -> str:
        """What runs the text engine ("onnxruntime:CPUExecutionProvider", "tensorrt:...")."""
        return self.runner.description

    def embed_prompts(self, prompts: Sequence[str], progress: Progress | None = None):
        """L2-normalised embeddings [P, E] float32 of raw prompts, in order."""
        tokens = self.tokenizer(list(prompts), self.context_length)
        return embed_prompts(tokens, self.runner, self.runner.max_batch, progress)

    def embed_classes(
        self,
        class_names: Sequence[str],
        templates: Sequence[str],
        progress: Progress | None = None,
    ) -> np.ndarray:
        """Per class, the L2-normalised mean of its normalised prompt embeddings, float32 [C, E].

        Exactly the exporter's rule (``vlm_export.export.graph.text_embeddings``): templates
        filled with ``prompt_name(class)``; a prompt longer than the context is cut keeping its
        end-of-text token, with a logged warning naming the class. TemplateError for a template
        without exactly one ``{}``.
        """
        check_classes(class_names)
        templates = check_templates(templates)
        prompts = build_prompts(class_names, templates)
        too_long = self.tokenizer.lengths(prompts) > self.context_length
        warn_truncated(class_names, len(templates), too_long, self.context_length)
        embeddings = self.embed_prompts(prompts, progress)
        return class_embeddings(embeddings, class_names, len(templates))


def _has_trt(manifest: dict[str, Any]) -> bool:
    return bool(engines_of_role(manifest.get("engines") or [], TEXT_ROLE))
