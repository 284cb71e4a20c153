"""Teaching a running ``vlm-edge serve`` by example: does learning stall the cameras?

One service on BUNDLE (e.g. a ViT-B/16 export with random weights) with two looping sources. In
interleaved phases of ``--seconds`` each, the sources run alone ("quiet") or while a client
teaches ``--rate`` examples a second ("teaching"): each example labels a frame a source just
decided (``POST /v1/examples`` with its source and seq, as the page does), with a label drawn
from a few classes, and every third is deleted again later. Reported:

- the sources' frame rate in each phase (decisions per second, both sources), and the ratio
  teaching / quiet of the phase medians (target: at least 0.90);
- the time from sending a teach to its answer, p50 and p95: the answer comes once the example is
  in the decisions, so this is also the time until it decides frames (target p95: 1 s);
- the process's resident memory at the end, against the learner's peak that the service states
  at start for its --teach-hidden-dim and --teach-max-examples.

Numbers are ratios within one run on one machine (its CPU and flags recorded). Prints a summary
and writes benchmarks/results/teach.json and teach.png (with matplotlib).

    python benchmarks/bench_teach.py BUNDLE [--seconds 30] [--phases 4] [--rate 2]
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from common import RESULTS, machine, pyplot, save_plot, write_json  # noqa: E402
from liveserver import serving  # noqa: E402

from vlm_export.runtime.serve.config import ServeSettings  # noqa: E402
from vlm_export.runtime.serve.service import Service  # noqa: E402
from vlm_export.runtime.teach.learner import DEFAULT_HIDDEN_DIM, TeachLearner  # noqa: E402

LABELS = ("forklift", "pallet", "unknown")


def write_frames(folder: Path, count: int, seed: int) -> Path:
    """``count`` 640x480 PNGs of tinted noise (what a looping camera source reads)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        tint = rng.integers(0, 256, 3)
        noise = rng.integers(-40, 40, (480, 640, 3))
        pixels = np.clip(tint[None, None, :] + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"frame_{index:03d}.png")
    return folder


def frames(client: httpx.Client, url: str) -> tuple[int, dict[str, int]]:
    """Frames decided so far in all, and each source's newest seq."""
    sources = client.get(f"{url}/v1/sources").json()["sources"]
    return sum(s["frames"] for s in sources), {s["name"]: s["seq"] for s in sources}


def teach_for(url: str, seconds: float, rate: float, seed: int) -> list[float]:
    """Teach ``rate`` examples a second for ``seconds``; the milliseconds of each answer."""
    rng = np.random.default_rng(seed)
    answers: list[float] = []
    taught: list[str] = []
    with httpx.Client(timeout=30) as client:
        start = time.monotonic()
        due = start
        while time.monotonic() - start < seconds:
            time.sleep(max(0.0, due - time.monotonic()))
            due += 1.0 / rate
            _, seqs = frames(client, url)
            source = str(rng.choice(sorted(seqs)))
            body = {"source": source, "seq": seqs[source], "label": str(rng.choice(LABELS))}
            sent = time.perf_counter()
            reply = client.post(f"{url}/v1/examples", json=body)
            if reply.status_code != 200:
                continue  # a seq with no embedding kept (a failed frame): skipped
            answers.append((time.perf_counter() - sent) * 1000.0)
            taught.append(reply.json()["id"])
            if len(taught) % 3 == 0:
                client.delete(f"{url}/v1/examples/{taught[-3]}")
    return answers


def phase(url: str, seconds: float, teaching: bool, seed: int) -> dict[str, Any]:
    """One phase: the sources' decisions per second, and the teach answers while teaching."""
    with httpx.Client(timeout=30) as client:
        before, _ = frames(client, url)
        start = time.monotonic()
        answers = teach_for(url, seconds, ARGS.rate, seed) if teaching else []
        if not teaching:
            time.sleep(seconds)
        after, _ = frames(client, url)
    return {
        "teaching": teaching,
        "fps": (after - before) / (time.monotonic() - start),
        "answers_ms": answers,
    }


def main() -> None:
    bundle = Path(ARGS.bundle)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        settings = ServeSettings(
            bundle=str(bundle),
            sources=[
                ("dock", str(write_frames(root / "dock", 12, seed=1))),
                ("yard", str(write_frames(root / "yard", 12, seed=2))),
            ],
            loop=True,
            state_dir=str(root / "states"),
            quiet=True,
            threads=ARGS.threads,
        )
        service = Service.open(settings)
        print("\n".join(service.notes), flush=True)
        with service, serving(service) as url:
            time.sleep(ARGS.warmup)
            phases = []
            for index in range(ARGS.phases):
                for teaching in (False, True) if index % 2 == 0 else (True, False):
                    done = phase(url, ARGS.seconds, teaching, seed=index)
                    phases.append(done)
                    answers = done["answers_ms"]
                    print(
                        f"phase {len(phases)}: {'teaching' if teaching else 'quiet   '} "
                        f"{done['fps']:.2f} frames/s"
                        + (f", {len(answers)} taught, p95 {np.percentile(answers, 95):.0f} ms"
                           if answers else ""),
                        flush=True,
                    )  # fmt: skip
            learned = service.teaching.learner.num_samples
            labels = len(service.bundle.classes) + 1
        rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    dim = int(np.load(bundle / "text_embeddings.npy", mmap_mode="r").shape[1])
    budget = TeachLearner.peak_bytes(dim, DEFAULT_HIDDEN_DIM, 5000, labels) / 2**20
    quiet = [p["fps"] for p in phases if not p["teaching"]]
    busy = [p["fps"] for p in phases if p["teaching"]]
    answers = [ms for p in phases for ms in p["answers_ms"]]
    report = {
        "bundle": str(bundle),
        "machine": machine(),
        "seconds_per_phase": ARGS.seconds,
        "rate_per_s": ARGS.rate,
        "phases": phases,
        "fps_quiet_median": float(np.median(quiet)),
        "fps_teaching_median": float(np.median(busy)),
        "fps_ratio": float(np.median(busy) / np.median(quiet)),
        "answer_ms_p50": float(np.percentile(answers, 50)),
        "answer_ms_p95": float(np.percentile(answers, 95)),
        "examples_held_at_end": learned,
        "peak_rss_mb": rss_mb,
        "learner_budget_mb": budget,
    }
    print(
        f"frame rate teaching / quiet: {report['fps_ratio']:.3f} "
        f"({report['fps_teaching_median']:.2f} / {report['fps_quiet_median']:.2f} frames/s); "
        f"teach answered (in the decisions) p50 {report['answer_ms_p50']:.0f} ms, p95 "
        f"{report['answer_ms_p95']:.0f} ms; peak RSS {rss_mb:.0f} MB (engine included), learner "
        f"budget {budget:.0f} MB"
    )
    write_json(RESULTS / "teach.json", report)
    plt = pyplot()
    if plt is not None:
        figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
        colors = ["#2563eb" if p["teaching"] else "#9ca3af" for p in phases]
        left.bar(range(1, len(phases) + 1), [p["fps"] for p in phases], color=colors)
        left.set_xlabel("phase (blue: teaching, grey: quiet)")
        left.set_ylabel("frames / s, both sources")
        left.set_title(f"frame rate, teaching / quiet = {report['fps_ratio']:.3f}")
        right.hist(answers, bins=30, color="#2563eb")
        right.axvline(report["answer_ms_p95"], color="#b42318", label="p95")
        right.set_xlabel("ms from POST to answer (example in the decisions)")
        right.set_title(f"{len(answers)} examples taught at {ARGS.rate:g}/s")
        right.legend()
        figure.tight_layout()
        save_plot(figure, RESULTS / "teach.png")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", help="a bundle folder (e.g. ViT-B/16 with random weights)")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each phase")
    parser.add_argument("--phases", type=int, default=4, help="pairs of quiet/teaching phases")
    parser.add_argument("--rate", type=float, default=2.0, help="examples taught per second")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds before measuring")
    parser.add_argument("--threads", type=int, default=None, help="engine threads")
    ARGS = parser.parse_args()
    main()
