"""The bundle's text engine: tokenizer check, ONNX export, TensorRT operator check, parity.

A text engine is written only for a model whose tokenizer the runtime reproduces exactly
(open_clip's SimpleTokenizer with its own vocabulary, no extra special tokens) and whose text
tower is open_clip's causal, EOT-pooled CLIP transformer. Other models (Hugging Face tokenizers,
e.g. SigLIP) are exported without one, with a warning that says why.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F

from vlm_export.core.errors import UserError
from vlm_export.core.manifest import TEXT_EMBEDDING_OUTPUT, TEXT_ENCODER_ONNX, TOKENS_INPUT
from vlm_export.export.graph.onnx_export import export_text_onnx, graph_summary
from vlm_export.export.graph.trt_ops import assert_tensorrt_compatible
from vlm_export.models.text_tower import TextTower, describe, text_tower_problem
from vlm_export.runtime.engines.checks.parity import compare_outputs
from vlm_export.runtime.text.prompts import parity_prompts, token_lengths
from vlm_export.runtime.text.tokenizer import CLEAN_FUNCTIONS, KIND, VOCAB_FILE, ClipTokenizer

MIN_COSINE = 0.9999
MAX_ABS = 1e-4
#: TensorRT optimisation profile of the tokens input: [batch, length] (length <= context)
PROFILE_BATCH = (1, 80, 256)
PROFILE_LENGTH_OPT = 16


class TextEngineSkipped(UserWarning):
    """The bundle is written without a text engine (the runtime cannot reproduce the model's)."""


class TextParityError(UserError):
    """The exported text engine does not compute what open_clip's encode_text computes."""


def _clean_name(tokenizer: Any) -> str | None:
    fn = getattr(tokenizer, "clean_fn", None)
    for name in CLEAN_FUNCTIONS:
        if getattr(fn, "__name__", "") == f"_clean_{name}":
            return name
    return None


def tokenizer_problem(tokenizer: Any) -> str | None:
    """Why the runtime cannot reproduce this open_clip tokenizer exactly (None when it can)."""
    from open_clip.tokenizer import SimpleTokenizer, default_bpe

    if type(tokenizer) is not SimpleTokenizer:
        return f"its tokenizer is {type(tokenizer).__name__}, not open_clip's SimpleTokenizer"
    if getattr(tokenizer, "reduction_fn", None) is not None:
        return "its tokenizer shortens long texts at random (reduction_mask), not by truncation"
    if _clean_name(tokenizer) is None:
        return "its tokenizer uses an unknown text clean function"
    reference = ClipTokenizer.from_file(default_bpe(), _clean_name(tokenizer) or "lower")
    if tokenizer.encoder != reference.encoder:
        return "its tokenizer has another vocabulary or extra special tokens"
    return None


def text_engine_problem(model: torch.nn.Module, tokenizer: Any) -> str | None:
    """Why this model gets no text engine (None when it does)."""
    return tokenizer_problem(tokenizer) or text_tower_problem(model)


def warn_skipped(model_name: str, problem: str) -> None:
    """Say that the bundle is written without a text engine, and why."""
    warnings.warn(
        TextEngineSkipped(
            f"{model_name}: exporting without a text engine: {problem}; the runtime cannot "
            "change classes on the device for this bundle"
        ),
        stacklevel=2,
    )


def write_tokenizer(folder: Path, tokenizer: Any, context_length: int) -> dict[str, Any]:
    """Copy open_clip's vocabulary into the bundle; return the manifest's tokenizer section."""
    import open_clip
    from open_clip.tokenizer import default_bpe

    shutil.copyfile(default_bpe(), folder / VOCAB_FILE)
    from vlm_export.core.manifest import sha256_file

    return {
        "kind": KIND,
        "vocab": VOCAB_FILE,
        "sha256": sha256_file(folder / VOCAB_FILE),
        "clean": _clean_name(tokenizer),
        "context_length": context_length,
        "source": f"open_clip {open_clip.__version__} tokenizer.SimpleTokenizer",
    }


def parity_tokens(tokenizer: ClipTokenizer, context: int) -> np.ndarray:
    """Prompts for the parity check: short, accented, CJK/emoji, and one cut at the context."""
    return tokenizer(parity_prompts(), context)


def check_text_parity(
    tower: TextTower, model: torch.nn.Module, onnx_path: Path, tokens: np.ndarray
) -> dict[str, Any]:
    """ONNX Runtime (each batch cut to its longest prompt, and at full context) vs open_clip's
    ``encode_text`` at the full context, normalised; raise TextParityError below the bar."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        want = F.normalize(model.encode_text(torch.from_numpy(tokens)).float(), dim=-1).numpy()
    longest = int(token_lengths(tokens).max())
    cases = []
    for name, length in (("cut_to_longest", longest), ("full_context", tokens.shape[1])):
        got = session.run(None, {TOKENS_INPUT: np.ascontiguousarray(tokens[:, :length])})[0]
        cases.append(
            compare_outputs(
                name, {TEXT_EMBEDDING_OUTPUT: got}, {TEXT_EMBEDDING_OUTPUT: want}, "open_clip"
            )
        )
    cosine_min = min(case[TEXT_EMBEDDING_OUTPUT]["cosine"] for case in cases)
    max_abs = max(case[TEXT_EMBEDDING_OUTPUT]["max_abs"] for case in cases)
    report = {
        "reference": "open_clip encode_text, full context, normalised (fp32, CPU)",
        "runtime": f"onnxruntime {ort.__version__} CPUExecutionProvider",
        "prompts": len(tokens),
        "cosine_min": cosine_min,
        "max_abs": max_abs,
        "thresholds": {"cosine_min": MIN_COSINE, "max_abs": MAX_ABS},
        "cases": cases,
        "passed": cosine_min >= MIN_COSINE and max_abs <= MAX_ABS,
    }
    if not report["passed"]:
        raise TextParityError(
            f"the text engine differs from open_clip: cosine {cosine_min:.6f} (need >= "
            f"{MIN_COSINE}), max abs {max_abs:.2e} (need <= {MAX_ABS})"
        )
    return report


def export_text_engine(
    folder: Path, model: torch.nn.Module, tokenizer: Any, opset: int
) -> dict[str, dict[str, Any]]:
    """Write text_encoder.onnx and the vocabulary; return the ``text_encoder`` and ``tokenizer``
    manifest sections. Raises on a failed export, operator check or parity check."""
    tower = TextTower(model).eval()
    context = tower.context_length
    graph = export_text_onnx(tower, folder / TEXT_ENCODER_ONNX, opset)
    free = {TOKENS_INPUT: (0, 1), TEXT_EMBEDDING_OUTPUT: (0,)}
    ops = assert_tensorrt_compatible(graph, opset, free)
    tokenizer_section = write_tokenizer(folder, tokenizer, context)
    ours = ClipTokenizer.from_file(folder / VOCAB_FILE, tokenizer_section["clean"])
    parity = check_text_parity(
        tower, model, folder / TEXT_ENCODER_ONNX, parity_tokens(ours, context)
    )
    geometry = describe(tower)
    section = {
        "onnx": TEXT_ENCODER_ONNX,
        "opset": opset,
        "inputs": [{"name": TOKENS_INPUT, "shape": ["batch", "length"], "dtype": "int64"}],
        "outputs": [
            {
                "name": TEXT_EMBEDDING_OUTPUT,
                "shape": ["batch", geometry["embed_dim"]],
                "dtype": "float32",
            }
        ],
        "context_length": context,
        "min_length": 2,
        "profile": {
            TOKENS_INPUT: {
                "min": [PROFILE_BATCH[0], 2],
                "opt": [PROFILE_BATCH[1], min(PROFILE_LENGTH_OPT, context)],
                "max": [PROFILE_BATCH[2], context],
            }
        },
        "pooling": "eot_argmax",
        "embedding_normalized": True,
        "geometry": geometry,
        "graph": graph_summary(graph),
        "tensorrt_operator_check": {"passed": ops.ok, "notes": ops.notes},
        "parity": parity,
    }
    return {"text_encoder": section, "tokenizer": tokenizer_section}
