"""Peak memory per hostile input: each input's peak RSS against the same command's on a normal
input (the engine's own footprint), in one run, so the difference is what the input costs.

Inputs (built in a temporary folder): images whose header promises far more than their bytes
(1x100000 and 200000x1 PNGs of a few hundred bytes, a 40-megapixel PNG of one colour, RGBA and
16-bit ones, a 100-megapixel JPEG, huge GIF/TIFF/BMP/WebP headers, odd aspect ratios) through
``vlm-edge run``, ``explain`` and the Python API; a gzip-bombed tokenizer vocabulary; a 50 MB
class list, a class list of 8 MB blank lines and a deeply nested JSON one; a TCA state of 100,000
npz members. Each case runs in its own process; its peak RSS comes from ``os.wait4``.

    PYTHONPATH=. python benchmarks/bench_hostile_memory.py [--budget-mb 300]

Prints a table and saves benchmarks/results/hostile_memory.json. Needs onnx (tests/fakebundle.py).
"""

from __future__ import annotations

import argparse
import gzip
import os
import struct
import subprocess
import sys
import tempfile
import zipfile
import zlib
from pathlib import Path

import common
import numpy as np
from PIL import Image

ROOT = common.ROOT
sys.path.insert(0, str(ROOT / "tests"))
RESULTS = common.RESULTS / "hostile_memory.json"
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
EDGE = [sys.executable, "-m", "vlm_export.runtime"]
API = (
    "import sys\nfrom vlm_export.runtime import open_pipeline, UserError\n"
    "with open_pipeline(sys.argv[1], verify=False) as p:\n"
    "    try:\n        p.classify(sys.argv[2])\n    except UserError as e:\n"
    "        print(e, file=sys.stderr)\n"
)
VOCABULARY = (
    "import sys\nfrom vlm_export.runtime.text.tokenizer import read_merges, TokenizerError\n"
    "try:\n    read_merges(sys.argv[1])\n"
    "except TokenizerError as e:\n    print(e, file=sys.stderr)\n"
)


#: starts the measured command from a small process: a child's peak RSS counts the memory it
#: shared with its parent before exec, so the parent must not be this script (it holds images)
STARTER = (
    "import os, subprocess, sys\np = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)\n"
    "_, status, usage = os.wait4(p.pid, 0)\n"
    "print(usage.ru_maxrss, os.waitstatus_to_exitcode(status))\n"
)


def peak_rss(argv: list[str]) -> tuple[int, int, str]:
    """(peak RSS in bytes, exit status, last stderr line) of one child process."""
    done = subprocess.run(
        [sys.executable, "-c", STARTER, *argv], env=ENV, capture_output=True, text=True, check=True
    )
    kilobytes, code = (int(v) for v in done.stdout.split())
    lines = done.stderr.strip().splitlines()
    return kilobytes * 1024, code, (lines[-1] if lines else "")[:160]


def png_header_only(path: Path, width: int, height: int, mode: int = 2, depth: int = 8) -> None:
    """A PNG whose IHDR says width x height and whose one IDAT holds all-zero rows, compressed:
    a few hundred bytes (or kilobytes) that decode to the full size."""
    channels = {0: 1, 2: 3, 6: 4}[mode]
    row = b"\0" + bytes(width * channels * depth // 8)
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, depth, mode, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data)
                     + chunk(b"IEND", b""))  # fmt: skip


def make_images(folder: Path) -> dict[str, Path]:
    """Hostile images by name (and 'normal', a 640x480 photo-sized JPEG)."""
    folder.mkdir()
    out = {}
    rng = np.random.default_rng(0)
    out["normal"] = folder / "normal.jpg"
    Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(out["normal"])
    for name, (w, h, mode, depth) in {
        "png 1x100000": (1, 100_000, 0, 8),
        "png 200000x1": (200_000, 1, 2, 8),
        "png 60000x200 (300:1, refused)": (60_000, 200, 2, 8),
        "png 60000x240 (250:1, accepted)": (60_000, 240, 2, 8),
        "png 6300x6300 one colour (39.7 MP)": (6300, 6300, 2, 8),
        "png 6300x6300 RGBA (refused)": (6300, 6300, 6, 8),
        "png 3850x3850 RGBA (largest accepted)": (3850, 3850, 6, 8),
        "png 6300x6300 16-bit grey (refused)": (6300, 6300, 0, 16),
        "png 4890x4890 16-bit grey (largest accepted)": (4890, 4890, 0, 16),
        "png 50000x790 (63:1, 39.5 MP)": (50_000, 790, 2, 8),
    }.items():
        out[name] = folder / f"{w}x{h}-{mode}-{depth}.png"
        png_header_only(out[name], w, h, mode, depth)
    big = folder / "100mp.jpg"  # a real 12000x8400 JPEG: decoded at 1/4 scale (draft)
    Image.new("RGB", (12_000, 8_400), (40, 90, 160)).save(big, quality=30)
    out["jpeg 12000x8400 (100.8 MP)"] = big
    for fmt, suffix in (("GIF", ".gif"), ("TIFF", ".tif"), ("BMP", ".bmp"), ("WEBP", ".webp")):
        path = folder / f"wide{suffix}"
        Image.new("L" if fmt == "GIF" else "RGB", (16_000, 50)).save(path, format=fmt)
        out[f"{fmt.lower()} 16000x50 (320:1)"] = path
    return out


def gzip_bomb(path: Path, megabytes: int) -> None:
    with gzip.open(path, "wb", compresslevel=9) as handle:
        block = bytes(1 << 20)
        for _ in range(megabytes):
            handle.write(block)


def many_members(path: Path, count: int) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        for index in range(count):
            archive.writestr(f"a{index}.npy", b"")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-mb", type=float, default=300.0)
    options = parser.parse_args()
    from fakebundle import make_bundle

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        bundle = str(make_bundle(root / "bundle", method="tca", image_size=224))
        images = make_images(root / "images")
        normal = str(images["normal"])
        out = str(root / "explain")
        cases: dict[str, tuple[list[str], list[str]]] = {}
        commands = {
            "run": lambda image: [*EDGE, "run", bundle, image, "--out", os.devnull],
            "explain": lambda image: [*EDGE, "explain", bundle, image, "--out", out],
            "api": lambda image: [sys.executable, "-c", API, bundle, image],
        }
        for name, path in images.items():
            if name == "normal":
                continue
            for command in ("run", "explain", "api") if name.startswith("png 1x") else ("run",):
                cases[f"{command}: {name}"] = (
                    commands[command](str(path)), commands[command](normal)
                )  # fmt: skip
        for command in ("explain", "api"):
            cases[f"{command}: png 200000x1"] = (
                commands[command](str(images["png 200000x1"])), commands[command](normal)
            )  # fmt: skip
        bomb, small = root / "bomb.txt.gz", root / "small.txt.gz"
        gzip_bomb(bomb, 512)
        gzip_bomb(small, 1)
        cases["tokenizer vocabulary: gzip bomb (512 MB unpacked)"] = (
            [sys.executable, "-c", VOCABULARY, str(bomb)],
            [sys.executable, "-c", VOCABULARY, str(small)],
        )
        normal_list = root / "classes.txt"
        normal_list.write_text("cat\ndog\n")
        big_list = root / "big.txt"
        with open(big_list, "w") as handle:
            for index in range(2_500_000):
                handle.write(f"class number {index}\n")  # about 50 MB
        blank_list = root / "blank.txt"
        blank_list.write_bytes(b"\n" * (8 << 20))
        nested = root / "nested.json"
        nested.write_text("[" * 1_000_000 + "]" * 1_000_000)
        for name, path in (("50 MB class list", big_list), ("8 MB of blank lines", blank_list),
                           ("JSON nested 1,000,000 deep", nested)):  # fmt: skip
            cases[f"classes: {name}"] = (
                [*EDGE, "classes", bundle, str(path), "--no-verify"],
                [*EDGE, "classes", bundle, str(normal_list), "--no-verify"],
            )
        state = root / "members.npz"
        many_members(state, 100_000)
        cases["run: TCA state of 100,000 npz members"] = (
            [*EDGE, "run", bundle, normal, "--state", str(state), "--out", os.devnull],
            [*EDGE, "run", bundle, normal, "--out", os.devnull],
        )
        for name, (hostile, reference) in cases.items():
            peak, code, line = peak_rss(hostile)
            line = line.replace(tmp, "TMP")  # no machine path in the saved table
            base, _, _ = peak_rss(reference)
            rows.append({
                "input": name, "peak_mb": peak / 2**20, "baseline_mb": base / 2**20,
                "difference_mb": (peak - base) / 2**20, "exit": code, "message": line,
            })  # fmt: skip
            print(f"{name:<58} {peak / 2**20:7.0f} {base / 2**20:7.0f} "
                  f"{(peak - base) / 2**20:+7.0f}  exit {code}  {line[:70]}")  # fmt: skip
    worst = max(row["difference_mb"] for row in rows)
    result = {
        "machine": common.machine(),
        "budget_mb": options.budget_mb,
        "worst_difference_mb": worst,
        "all_within_budget": worst < options.budget_mb,
        "rows": rows,
    }
    common.write_json(RESULTS, result, indent=1)
    print(f"worst difference {worst:.0f} MB (budget {options.budget_mb:g} MB)")


if __name__ == "__main__":
    main()
