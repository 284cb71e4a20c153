"""Which text engine shape to ship: static context, static length buckets, or a free length axis.

ViT-B-16's text tower (random weights, ``--pretrained none``: timing does not depend on weights)
is exported three ways, all with a free batch axis, and run on ONNX Runtime CPU:

- ``static77``: length fixed at the full context (77); every prompt padded to 77.
- ``buckets``: one engine per length 16 / 32 / 77; a batch goes to the smallest that fits.
- ``dynamic``: a free length axis; a batch is cut to its longest prompt.

Workload: the device's job, one class x CLIP's 80 ImageNet templates in one batch (longest prompt
12 tokens for "cat"), for a short and a long class name. Wall and process CPU seconds are both
recorded (on a shared machine CPU seconds are the steadier measure). The three
variants alternate round by round, so a busy machine slows them alike: compare ratios.

    python benchmarks/bench_text_engine.py [--rounds 3] [--model ViT-B-16]

Prints and writes benchmarks/results/text_engine.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import common
import numpy as np
import onnxruntime as ort

from vlm_export.export.graph.onnx_export import export_text_onnx
from vlm_export.export.graph.text_embeddings import build_prompts
from vlm_export.models.loading import load_clip
from vlm_export.models.text_tower import TextTower
from vlm_export.runtime.text.encoder import OnnxRuntimeTextRunner, TextEncoder
from vlm_export.runtime.text.templates import IMAGENET80
from vlm_export.runtime.text.tokenizer import ClipTokenizer

RESULTS = common.RESULTS / "text_engine.json"
BUCKETS = (16, 32, 77)
CLASSES = ("cat", "Lesser Spotted Woodpecker of the northern forests")


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _run(session: ort.InferenceSession, tokens: np.ndarray) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one run."""
    return common.wall_and_cpu_seconds(lambda: session.run(None, {"tokens": tokens}))


def _timed_embed(encoder: TextEncoder, classname: str) -> tuple[float, float]:
    return common.wall_and_cpu_seconds(lambda: encoder.embed_classes([classname], IMAGENET80))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    loaded = load_clip(args.model, "none")
    tower = TextTower(loaded.model).eval()
    context = tower.context_length
    tokenizer = ClipTokenizer.from_file(_vocab_path())
    with tempfile.TemporaryDirectory() as folder:
        sizes, sessions = {}, {}
        for name, length in [("dynamic", None), *[(f"static{n}", n) for n in BUCKETS]]:
            path = Path(folder) / f"{name}.onnx"
            export_text_onnx(tower, path, length=length)
            sizes[name] = path.stat().st_size
            sessions[name] = _session(path)
        dynamic_runner = OnnxRuntimeTextRunner(Path(folder) / "dynamic.onnx")
        results = []
        for classname in CLASSES:
            prompts = build_prompts([classname], IMAGENET80)
            full = tokenizer(prompts, context)
            longest = int(tokenizer.lengths(prompts).max())
            bucket = next(n for n in BUCKETS if n >= longest)
            feeds = {
                "static77": ("static77", full),
                "buckets": (f"static{bucket}", full[:, :bucket]),
                "dynamic": ("dynamic", full[:, :longest]),
            }
            for engine, tokens in feeds.values():
                _run(sessions[engine], tokens)  # warm-up
            times: dict[str, list[tuple[float, float]]] = {name: [] for name in feeds}
            for _ in range(args.rounds):
                for name, (engine, tokens) in feeds.items():
                    times[name].append(_run(sessions[engine], tokens))
            wall = {name: float(np.median([t[0] for t in v])) for name, v in times.items()}
            cpu = {name: float(np.median([t[1] for t in v])) for name, v in times.items()}
            encoder = TextEncoder(dynamic_runner, tokenizer, context)
            device = [_timed_embed(encoder, classname) for _ in range(args.rounds)]
            results.append(
                {
                    "class": classname,
                    "prompts": len(prompts),
                    "longest_tokens": longest,
                    "bucket": bucket,
                    "wall_seconds_median": wall,
                    "cpu_seconds_median": cpu,
                    "wall_speedup_vs_static77": {n: wall["static77"] / t for n, t in wall.items()},
                    "cpu_speedup_vs_static77": {n: cpu["static77"] / t for n, t in cpu.items()},
                    "embed_classes_one_class_80_templates": {
                        "what": "TextEncoder.embed_classes([class], IMAGENET80), dynamic engine, "
                        "tokenizer included",
                        "wall_seconds_median": float(np.median([d[0] for d in device])),
                        "cpu_seconds_median": float(np.median([d[1] for d in device])),
                    },
                }
            )
            print(json.dumps(results[-1]), flush=True)
    report = {
        "benchmark": "text engine shape on ONNX Runtime CPU",
        "model": args.model,
        "workload": "one class x 80 ImageNet templates, one batch",
        "rounds": args.rounds,
        "onnx_bytes": sizes,
        "bundle_bytes": {
            "static77": sizes["static77"],
            "buckets": sum(sizes[f"static{n}"] for n in BUCKETS),
            "dynamic": sizes["dynamic"],
        },
        "results": results,
        "machine": {
            **common.machine(),
            "load_average_1min": os.getloadavg()[0],
            "onnxruntime": ort.__version__,
        },
    }
    common.write_json(RESULTS, report)


def _vocab_path() -> str:
    from open_clip.tokenizer import default_bpe

    return default_bpe()


if __name__ == "__main__":
    main()
