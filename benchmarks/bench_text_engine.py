"""Which text engine shape to ship: static context, static length buckets, or a free length axis.

ViT-B-16's text tower (random weights, ``--pretrained none``: timing does not depend on weights)
is exported three ways, all with a free batch axis, and run on ONNX Runtime CPU:

- ``static77``: length fixed at the full context (77); every prompt padded to 77.
- ``buckets``: one engine per length 16 / 32 / 77; a batch goes to the smallest that fits.
- ``dynamic``: a free length axis; a batch is cut to its longest prompt.

Workload: the device's job, one class x CLIP's 80 ImageNet templates in one batch (longest prompt
~16 tokens for a short class name), for three class names of different lengths. The three
variants alternate round by round, so a busy machine slows them alike: compare ratios.

    python benchmarks/bench_text_engine.py [--rounds 5] [--model ViT-B-16]

Prints and writes benchmarks/results/text_engine.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from vlm_export.export.onnx_export import export_text_onnx
from vlm_export.export.text_embeddings import build_prompts
from vlm_export.models.loading import load_clip
from vlm_export.models.text_tower import TextTower
from vlm_export.runtime.text.templates import IMAGENET80
from vlm_export.runtime.text.tokenizer import ClipTokenizer

RESULTS = Path(__file__).resolve().parent / "results" / "text_engine.json"
BUCKETS = (16, 32, 77)
CLASSES = ("cat", "golden retriever", "Lesser Spotted Woodpecker of the northern forests")


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _run(session: ort.InferenceSession, tokens: np.ndarray) -> float:
    start = time.perf_counter()
    session.run(None, {"tokens": tokens})
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--rounds", type=int, default=5)
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
            times: dict[str, list[float]] = {name: [] for name in feeds}
            for _ in range(args.rounds):
                for name, (engine, tokens) in feeds.items():
                    times[name].append(_run(sessions[engine], tokens))
            median = {name: float(np.median(values)) for name, values in times.items()}
            results.append(
                {
                    "class": classname,
                    "prompts": len(prompts),
                    "longest_tokens": longest,
                    "bucket": bucket,
                    "seconds_median": median,
                    "speedup_vs_static77": {n: median["static77"] / t for n, t in median.items()},
                }
            )
            print(json.dumps(results[-1]))
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
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "onnxruntime": ort.__version__,
        },
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {RESULTS}")


def _vocab_path() -> str:
    from open_clip.tokenizer import default_bpe

    return default_bpe()


if __name__ == "__main__":
    main()
