"""The exporter's text embeddings: full 77-token context (before) vs the fast path (after).

ViT-B-16 with random weights (``--pretrained none``; timing does not depend on the weights).
Both paths embed the same prompts, CLIP's 80 ImageNet templates filled with a sample of
ImageNet-style class names, in batches of 256:

- before: ``model.encode_text`` on every prompt at the full context (the old exporter);
- after: ``encode_class_texts`` (prompts sorted by length, each batch cut to its longest prompt).

The two alternate round by round (ratios in one run). The time for 1000 classes x 80 templates
(80,000 prompts) is EXTRAPOLATED from the measured prompts per second of the sample, which is
stated in the JSON; wall and process CPU seconds are both recorded (the machine is shared).

    python benchmarks/bench_text_embeddings.py [--classes 2] [--rounds 2] [--device cpu]

Prints and writes benchmarks/results/text_embeddings.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from vlm_export.export.text_embeddings import build_prompts, encode_class_texts
from vlm_export.models.loading import load_clip
from vlm_export.runtime.text.templates import IMAGENET80

RESULTS = Path(__file__).resolve().parent / "results" / "text_embeddings.json"
SAMPLE = ("great white shark", "African bush elephant", "tench", "golden retriever")
FULL_JOB = 1000 * len(IMAGENET80)


def _timed(fn) -> tuple[float, float]:
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - start, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--classes", type=int, default=2, help="class names of the sample (<= 4)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    loaded = load_clip(args.model, "none")
    model = loaded.model.to(args.device)
    classes = list(SAMPLE[: args.classes])
    prompts = build_prompts(classes, IMAGENET80)
    tokens = loaded.tokenizer(prompts).to(args.device)

    def before() -> None:
        with torch.no_grad():
            for start in range(0, len(tokens), 256):
                model.encode_text(tokens[start : start + 256])

    def after() -> None:
        encode_class_texts(model, loaded.tokenizer, classes, IMAGENET80)

    after()  # warm-up
    times: dict[str, list[tuple[float, float]]] = {"before": [], "after": []}
    for _ in range(args.rounds):
        times["before"].append(_timed(before))
        times["after"].append(_timed(after))
    wall = {k: float(np.median([t[0] for t in v])) for k, v in times.items()}
    cpu = {k: float(np.median([t[1] for t in v])) for k, v in times.items()}
    rate = {k: len(prompts) / v for k, v in wall.items()}
    report = {
        "benchmark": "exporter text embeddings, full context vs length-sorted cut batches",
        "model": args.model,
        "device": args.device,
        "sample": {"classes": classes, "templates": "imagenet80", "prompts": len(prompts)},
        "rounds": args.rounds,
        "wall_seconds_median": wall,
        "cpu_seconds_median": cpu,
        "prompts_per_second_wall": rate,
        "speedup_wall": wall["before"] / wall["after"],
        "speedup_cpu": cpu["before"] / cpu["after"],
        "extrapolated_1000_classes_x_80_templates_seconds": {
            "note": f"{FULL_JOB} prompts / measured prompts per second of the sample (wall)",
            "before": FULL_JOB / rate["before"],
            "after": FULL_JOB / rate["after"],
        },
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "load_average_1min": os.getloadavg()[0],
        },
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
