"""Teaching a running ``vlm-edge serve`` by example: does learning stall the cameras?

One service on BUNDLE (e.g. a ViT-B/16 export with random weights) with two looping sources. In
interleaved phases of ``--seconds`` each, the sources run alone ("quiet") or while a client
teaches ``--rate`` examples a second ("teaching"): each example labels a frame a source just
decided (``POST /v1/examples`` with its source and seq, as the page does), with a label drawn
from a few classes, and every third is deleted again later. Reported:

- the sources' frame rate in each phase (decisions per second, both sources), and the ratio
  teaching / quiet of the phase medians (target: at least 0.90);
- the time from sending a teach to its answer (the example stored and learned), p50 and p95, and
  from the answer to the first frame decided with it (target p95: 1 s);
- once, before the phases, the first example of each new label (it becomes a class: the text
  engine opens and embeds it), timed apart;
- the process's resident memory at the end, against the learner's peak that the service states
  at start for its --teach-hidden-dim and --teach-max-examples.

Numbers are ratios within one run on one machine (its CPU and flags recorded). Prints a summary
and writes benchmarks/results/teach.json and teach.png (with matplotlib).

    python benchmarks/bench_teach.py BUNDLE [--seconds 30] [--phases 4] [--rate 2]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import threading
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
NEW_LABEL = "line 3 jam"  # taught once before the phases: a class made by the text engine


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


class Installs:
    """When each offer of the learner reached the frames (polled every 2 ms, in-process)."""

    def __init__(self, service: Service) -> None:
        self.lanes = service.lanes
        self.at: dict[int, float] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        while not self.stop.wait(0.002):
            version = self.lanes.installed_version
            if version not in self.at:
                self.at[version] = time.perf_counter()

    def delay_ms(self, version: int, answered: float) -> float | None:
        """ms from ``answered`` until an offer at least as new as ``version`` was installed."""
        later = [t for v, t in self.at.items() if v >= version]
        return (min(later) - answered) * 1000.0 if later else None


def teach_for(
    url: str, seconds: float, rate: float, seed: int, service: Service
) -> tuple[list[float], list[tuple[int, float]]]:
    """Teach ``rate`` examples a second for ``seconds``: the milliseconds of each answer, and
    (offer version, answer time) of each."""
    rng = np.random.default_rng(seed)
    answers: list[float] = []
    offers: list[tuple[int, float]] = []
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
            answered = time.perf_counter()
            offers.append((service.lanes.offered_version, answered))
            answers.append((answered - sent) * 1000.0)
            taught.append(reply.json()["id"])
            if len(taught) % 3 == 0:
                client.delete(f"{url}/v1/examples/{taught[-3]}")
    return answers, offers


def phase(
    url: str, seconds: float, teaching: bool, seed: int, service: Service, installs: Installs
) -> dict[str, Any]:
    """One phase: the sources' decisions per second; while teaching, each answer's time and the
    time from it to the first frame decided with it."""
    with httpx.Client(timeout=30) as client:
        before, _ = frames(client, url)
        start = time.monotonic()
        answers, offers = (
            teach_for(url, seconds, ARGS.rate, seed, service) if teaching else ([], [])
        )
        if not teaching:
            time.sleep(seconds)
        after, _ = frames(client, url)
    time.sleep(1.0)  # the last offers reach a frame
    delays = [installs.delay_ms(version, answered) for version, answered in offers]
    return {
        "teaching": teaching,
        "fps": (after - before) / (time.monotonic() - start - 1.0),
        "answers_ms": answers,
        "to_decisions_ms": [d for d in delays if d is not None],
        "never_installed": sum(d is None for d in delays),
    }


def first_examples(url: str) -> dict[str, float]:
    """The first example of each label (a new one becomes a class), ms to its answer."""
    costs = {}
    with httpx.Client(timeout=120) as client:
        for label in (*LABELS, NEW_LABEL):
            _, seqs = frames(client, url)
            source = sorted(seqs)[0]
            sent = time.perf_counter()
            reply = client.post(
                f"{url}/v1/examples", json={"source": source, "seq": seqs[source], "label": label}
            )
            reply.raise_for_status()
            costs[label] = (time.perf_counter() - sent) * 1000.0
    return costs


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        bundle = Path(shutil.copytree(ARGS.bundle, root / "bundle"))  # new labels change classes
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
            first = first_examples(url)
            print(f"first example of each label (ms): {first}", flush=True)
            time.sleep(ARGS.warmup)
            installs = Installs(service)
            phases = []
            for index in range(ARGS.phases):
                for teaching in (False, True) if index % 2 == 0 else (True, False):
                    done = phase(url, ARGS.seconds, teaching, index, service, installs)
                    phases.append(done)
                    answers, reach = done["answers_ms"], done["to_decisions_ms"]
                    print(
                        f"phase {len(phases)}: {'teaching' if teaching else 'quiet   '} "
                        f"{done['fps']:.2f} frames/s"
                        + (f", {len(answers)} taught, answer p95 "
                           f"{np.percentile(answers, 95):.0f} ms, in the decisions p95 "
                           f"{np.percentile(reach, 95):.0f} ms after it" if answers else ""),
                        flush=True,
                    )  # fmt: skip
            installs.stop.set()
            learned = service.teaching.learner.num_samples
            labels = len(service.bundle.classes) + 1
            dim = service.teaching.dim
            model = service.bundle.manifest["model"]["name"]
        rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    budget = TeachLearner.peak_bytes(dim, DEFAULT_HIDDEN_DIM, 5000, labels) / 2**20
    quiet = [p["fps"] for p in phases if not p["teaching"]]
    busy = [p["fps"] for p in phases if p["teaching"]]
    answers = [ms for p in phases for ms in p["answers_ms"]]
    reach = [ms for p in phases for ms in p["to_decisions_ms"]]
    report = {
        "bundle": Path(ARGS.bundle).name,  # its name only: results name no machine path
        "model": model,
        "first_example_of_each_label_ms": first,
        "machine": machine(),
        "seconds_per_phase": ARGS.seconds,
        "rate_per_s": ARGS.rate,
        "phases": phases,
        "fps_quiet_median": float(np.median(quiet)),
        "fps_teaching_median": float(np.median(busy)),
        "fps_ratio": float(np.median(busy) / np.median(quiet)),
        "answer_ms_p50": float(np.percentile(answers, 50)),
        "answer_ms_p95": float(np.percentile(answers, 95)),
        "answer_to_decisions_ms_p50": float(np.percentile(reach, 50)),
        "answer_to_decisions_ms_p95": float(np.percentile(reach, 95)),
        "answers_never_in_decisions": sum(p["never_installed"] for p in phases),
        "examples_held_at_end": learned,
        "peak_rss_mb": rss_mb,
        "learner_budget_mb": budget,
    }
    print(
        f"frame rate teaching / quiet: {report['fps_ratio']:.3f} "
        f"({report['fps_teaching_median']:.2f} / {report['fps_quiet_median']:.2f} frames/s); "
        f"teach answered p50 {report['answer_ms_p50']:.0f} ms, p95 "
        f"{report['answer_ms_p95']:.0f} ms, in the decisions p95 "
        f"{report['answer_to_decisions_ms_p95']:.0f} ms after the answer; peak RSS "
        f"{rss_mb:.0f} MB (engine included), learner budget {budget:.0f} MB"
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
        right.set_xlabel("ms from POST to answer (example learned)")
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
