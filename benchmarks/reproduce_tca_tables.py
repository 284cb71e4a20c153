"""Reproduce the TCA paper's cross-dataset table (and RAIL's X-TAIL line) on the datasets you have.

    python benchmarks/reproduce_tca_tables.py DATA_ROOT --pretrained openai [--work DIR]

DATA_ROOT holds any subset of the papers' datasets under their usual folder names (CoOp's
DATASETS.md layout: imagenet/, imagenet-adversarial/, dtd/, eurosat/, food-101/, ...). For each one
present this exports three ViT-B/16 bundles with the dataset's classes, templates and TCA preset
(``vlm-export --dataset``): the full tower, TCA R=0.9 (r=0.035) and TCA R=0.7 (r=0.1), runs
``vlm-edge eval-tta`` on both TCA bundles with the full one as baseline, and prints top-1 per
dataset beside the paper's published cross-dataset averages (spec/tca.md section 5). Absent
datasets are skipped with a line. ``--xtail ROOT --xtail-bundle B --order D1,...`` also runs
``vlm-edge eval`` (RAIL's X-TAIL protocol; ROOT in its layout, see ``vlm-edge eval --help``) and
prints Transfer / Average / Last beside the RAIL paper's. Results are saved as JSON in the
work folder.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import common

from vlm_export.runtime.datasets.registry import CROSS_DATASETS, DATASETS, find_dataset_root

#: spec/tca.md section 5: CLIP ViT-B/16, average over the ten cross-dataset sets (top-1 %)
PAPER_TCA = {"clip": 64.59, "tca_r0.9": 68.69, "tca_r0.7": 64.46}
#: spec/rail.md section 5: ViT-B/16, 16-shot, order I (Transfer / Average / Last %)
PAPER_RAIL = {
    "zero-shot": (57.7, None, None),
    "primal": (62.4, 70.7, 79.1),
    "dual": (62.4, 71.9, 82.4),
}
VARIANTS = {"full": ("zeroshot", None), "tca_r0.9": ("tca", 0.035), "tca_r0.7": ("tca", 0.1)}


def _run(command: list[str]) -> None:
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def export(args: argparse.Namespace, dataset: str, variant: str, out: Path) -> Path:
    """The bundle of ``dataset`` for one variant, exported once (kept in the work folder)."""
    if (out / "manifest.json").is_file():
        return out
    method, drop_rate = VARIANTS[variant]
    command = [
        sys.executable,
        "-m",
        "vlm_export.export.cli",
        "--method",
        method,
        "--model",
        args.model,
        "--pretrained",
        args.pretrained,
        "--dataset",
        dataset,
        "--out",
        str(out),
        "--quiet",
    ]
    if drop_rate is not None:
        command += ["--drop-rate", str(drop_rate)]
    _run(command)
    return out


def evaluate(args: argparse.Namespace, dataset: str, root: Path) -> dict[str, float]:
    """Top-1 (%) of zero-shot on the full tower and of TCA at both budgets on one dataset."""
    bundles = {v: export(args, dataset, v, args.work / f"{dataset}-{v}") for v in VARIANTS}
    scores: dict[str, float] = {}
    for variant in ("tca_r0.9", "tca_r0.7"):
        report = args.work / f"{dataset}-{variant}.json"
        command = [
            sys.executable,
            "-m",
            "vlm_export.runtime",
            "eval-tta",
            str(bundles[variant]),
            str(root),
            "--dataset",
            dataset,
            "--seed",
            str(args.seed),
            "--json",
            str(report),
            "--quiet",
        ]
        if variant == "tca_r0.9":
            command += ["--baseline", str(bundles["full"])]
        if args.limit:
            command += ["--limit", str(args.limit)]
        _run(command)
        results = json.loads(report.read_text())["results"]
        if "baseline" in results:
            scores["clip"] = 100 * results["baseline"]["top1"]
        scores[variant] = 100 * results["tca"]["top1"]
    return scores


def tca_table(measured: dict[str, dict[str, float]]) -> list[str]:
    """Per-dataset top-1, the cross-dataset average, and the paper's average beside it."""
    lines = [f"{'dataset':<18}{'CLIP':>8}{'TCA R=0.9':>11}{'TCA R=0.7':>11}"]
    for name, scores in measured.items():
        row = "".join(
            f"{scores.get(k, float('nan')):>{w}.2f}"
            for k, w in (("clip", 8), ("tca_r0.9", 11), ("tca_r0.7", 11))
        )
        lines.append(f"{DATASETS[name].title:<18}{row}")
    cross = [measured[n] for n in CROSS_DATASETS if n in measured]
    if cross:
        mean = {k: sum(s[k] for s in cross) / len(cross) for k in PAPER_TCA}
        label = f"average ({len(cross)}/10)"
        lines.append(
            f"{label:<18}"
            + "".join(
                f"{mean[k]:>{w}.2f}" for k, w in (("clip", 8), ("tca_r0.9", 11), ("tca_r0.7", 11))
            )
        )
    lines.append(
        f"{'paper (10 sets)':<18}"
        + "".join(
            f"{PAPER_TCA[k]:>{w}.2f}" for k, w in (("clip", 8), ("tca_r0.9", 11), ("tca_r0.7", 11))
        )
    )
    return lines


def xtail(args: argparse.Namespace) -> list[str]:
    """RAIL's X-TAIL metrics beside the paper's (vlm-edge eval on a RAIL bundle of the order)."""
    report = args.work / "xtail.json"
    command = [
        sys.executable,
        "-m",
        "vlm_export.runtime",
        "eval",
        str(args.xtail_bundle),
        str(args.xtail),
        "--order",
        args.order,
        "--json",
        str(report),
        "--quiet",
    ]
    _run(command)
    results = json.loads(report.read_text())["results"]
    lines = [f"{'X-TAIL':<14}{'Transfer':>10}{'Average':>10}{'Last':>10}   paper"]
    for name, result in results.items():
        values = "".join(
            f"{100 * (result[m] or 0):>10.1f}" for m in ("transfer", "average", "last")
        )
        paper = PAPER_RAIL.get(name.split()[0].lower(), ())
        lines.append(
            f"{name:<14}{values}   {' / '.join('-' if v is None else str(v) for v in paper)}"
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data_root", type=Path)
    parser.add_argument("--pretrained", default="openai")
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--work", type=Path, default=Path("benchmarks/work/tables"))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--limit", type=int, help="images per dataset (a quick look)")
    parser.add_argument("--datasets", help="comma-separated subset (default: all present)")
    parser.add_argument("--xtail", type=Path, help="X-TAIL data root (vlm-edge eval layout)")
    parser.add_argument("--xtail-bundle", type=Path, help="tca+rail bundle of the X-TAIL classes")
    parser.add_argument("--order", help="X-TAIL domain order")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    names = args.datasets.split(",") if args.datasets else list(DATASETS)
    measured: dict[str, dict[str, float]] = {}
    for name in names:
        spec = DATASETS[name]
        root = find_dataset_root(spec, args.data_root)
        if root is None:
            print(
                f"skip {spec.title}: not under {args.data_root} "
                f"(looked for {', '.join(dict.fromkeys(spec.roots))})",
                flush=True,
            )
            continue
        measured[name] = evaluate(args, name, root)
    lines = tca_table(measured) if measured else ["no dataset found"]
    if args.xtail:
        lines += ["", *xtail(args)]
    print("\n".join(lines))
    tables = {"tca": measured, "paper_tca": PAPER_TCA, "text": lines}
    common.write_json(args.work / "tables.json", tables)
    return 0


if __name__ == "__main__":
    sys.exit(main())
