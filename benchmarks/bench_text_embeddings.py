"""The exporter's text embeddings: full context, cut batches, and cached template prefixes.

ViT-B-16 with random weights (``--pretrained none``; timing does not depend on the weights), on
CLIP's 80 ImageNet templates filled with a seeded sample of CLIP's ImageNet class names, three
ways (alternating round by round, so a busy machine slows them alike: compare ratios):

- ``full_context``: ``model.encode_text`` on every prompt at the full 77-token context, batches
  of 256 (the first release's exporter);
- ``cut_batches``: prompts sorted by length, each batch cut to its longest prompt, through the
  text tower (the previous release's exporter, and what the device's text engine does);
- ``shared_prefix``: ``encode_class_texts`` today: each template's prefix shared by all classes
  computed once, then only each prompt's own tokens (cut batches of those).

Then the real job, measured, not extrapolated: ``encode_class_texts`` on all 1000 ImageNet classes
x 80 templates (80,000 prompts), tokenizer included, once (``--skip-full-job`` to leave it out).
Wall and process CPU seconds are both recorded (the machine may be shared).

    python benchmarks/bench_text_embeddings.py [--classes 10] [--rounds 2] [--skip-full-job]

Prints and writes benchmarks/results/text_embeddings.json.
"""

from __future__ import annotations

import argparse
import json
import os

import common
import numpy as np
import torch

from vlm_export.export.graph.text_embeddings import build_prompts, encode_class_texts
from vlm_export.models.loading import load_clip
from vlm_export.models.text_tower import TextTower
from vlm_export.runtime.datasets.registry import get_dataset
from vlm_export.runtime.text.prompts import embed_prompts
from vlm_export.runtime.text.templates import IMAGENET80

RESULTS = common.RESULTS / "text_embeddings.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--classes", type=int, default=10, help="ImageNet classes in the sample")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--skip-full-job", action="store_true")
    args = parser.parse_args()
    loaded = load_clip(args.model, "none")
    model = loaded.model.to(args.device).eval()
    tower = TextTower(model).eval()
    imagenet = get_dataset("imagenet").classes
    picks = np.random.default_rng(0).choice(len(imagenet), args.classes, replace=False)
    classes = [imagenet[i] for i in sorted(picks)]
    prompts = build_prompts(classes, IMAGENET80)

    def full_context() -> None:
        tokens = loaded.tokenizer(prompts).to(args.device)
        with torch.inference_mode():
            for start in range(0, len(tokens), 256):
                model.encode_text(tokens[start : start + 256])

    def cut_batches() -> None:
        tokens = loaded.tokenizer(prompts).numpy().astype(np.int64)
        with torch.inference_mode():
            embed_prompts(
                tokens, lambda t: tower(torch.from_numpy(t).to(args.device)).cpu().numpy(), 256
            )

    def shared_prefix() -> None:
        encode_class_texts(model, loaded.tokenizer, classes, IMAGENET80)

    paths = {
        "full_context": full_context,
        "cut_batches": cut_batches,
        "shared_prefix": shared_prefix,
    }
    shared_prefix()  # warm-up
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in paths}
    for _ in range(args.rounds):
        for name, path in paths.items():
            times[name].append(common.wall_and_cpu_seconds(path))
    wall = {k: float(np.median([t[0] for t in v])) for k, v in times.items()}
    cpu = {k: float(np.median([t[1] for t in v])) for k, v in times.items()}
    report: dict[str, object] = {
        "benchmark": "exporter text embeddings: full context, cut batches, cached prefixes",
        "model": args.model,
        "device": args.device,
        "sample": {
            "classes": classes,
            "templates": "imagenet80",
            "prompts": len(prompts),
        },
        "rounds": args.rounds,
        "wall_seconds_median": wall,
        "cpu_seconds_median": cpu,
        "prompts_per_second_wall": {k: len(prompts) / v for k, v in wall.items()},
        "speedup_wall_vs_full_context": {k: wall["full_context"] / v for k, v in wall.items()},
        "speedup_wall_vs_cut_batches": {k: wall["cut_batches"] / v for k, v in wall.items()},
        "speedup_cpu_vs_full_context": {k: cpu["full_context"] / v for k, v in cpu.items()},
    }
    if not args.skip_full_job:
        job_wall, job_cpu = common.wall_and_cpu_seconds(
            lambda: encode_class_texts(model, loaded.tokenizer, imagenet, IMAGENET80)
        )
        report["full_job_1000_classes_x_80_templates"] = {
            "prompts": len(imagenet) * len(IMAGENET80),
            "what": "encode_class_texts (shared_prefix), tokenizer included, measured once",
            "wall_seconds": job_wall,
            "cpu_seconds": job_cpu,
            "full_context_extrapolated_wall_seconds": len(imagenet)
            * len(IMAGENET80)
            / report["prompts_per_second_wall"]["full_context"],  # type: ignore[index]
        }
    report["machine"] = {
        **common.machine(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0],
    }
    print(json.dumps(report, indent=2))
    common.write_json(RESULTS, report)


if __name__ == "__main__":
    main()
