"""GFLOPs of the image tower, in the paper's convention: one multiply-add = one FLOP.

Two independent counts: the closed form below (patch embedding, per-block attention and MLP at the
scheduled token counts, projection), and torch's own FlopCounterMode run on the tower (which
counts 2 FLOPs per multiply-add, so it is halved). Both count matrix products only.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from vlm_export.models.condensing_tower import CondensingVisionTower
from vlm_export.models.schedule import CondensationConfig, ScheduleError
from vlm_export.models.tracing import plain_attention


def block_macs(tokens_attn: int, tokens_mlp: int, width: int, mlp_ratio: float = 4.0) -> int:
    """Multiply-adds of one block: qkv/out projections + QK^T + AV on the attention tokens, MLP
    on the tokens left after condensation."""
    attention = 4 * tokens_attn * width * width + 2 * tokens_attn * tokens_attn * width
    mlp = 2 * tokens_mlp * width * int(width * mlp_ratio)
    return attention + mlp


def closed_form_gflops(tower: CondensingVisionTower, with_anchor: bool = False) -> float:
    """Closed-form GFLOPs of the tower at its token schedule.

    ``with_anchor`` adds the injected anchor token (one more key/value) at reduction blocks; the
    paper's numbers count the tower without it.
    """
    geometry = tower.geometry
    width, patch = geometry["width"], geometry["patch_size"]
    mlp_ratio = tower.visual.transformer.resblocks[0].mlp.c_fc.out_features / width
    macs = geometry["num_patches"] * width * 3 * patch * patch  # patch embedding
    outputs = {counts.layer: counts.tokens_out for counts in tower.schedule}
    for block, tokens in enumerate(tower.tokens_per_block):
        extra = 1 if with_anchor and block in outputs else 0
        if extra:
            # queries stay N (the anchor's row is dropped); keys/values are N + 1
            macs += block_macs(tokens, outputs[block], width, mlp_ratio)
            macs += width * width * 2 + 2 * tokens * width
        else:
            macs += block_macs(tokens, outputs.get(block, tokens), width, mlp_ratio)
    macs += width * geometry["embed_dim"]  # projection
    return macs / 1e9


def counted_gflops(tower: CondensingVisionTower) -> float:
    """GFLOPs measured by torch's FlopCounterMode on one image (anchors valid), halved to MACs."""
    inputs = tower.example_inputs(1)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), plain_attention(), counter:
        tower(*inputs)
    return counter.get_total_flops() / 2 / 1e9


def flops_report(
    full: CondensingVisionTower, condensed: CondensingVisionTower | None
) -> dict[str, Any]:
    """The manifest's ``flops`` section: both counts for the full and the condensed tower."""
    report: dict[str, Any] = {
        "convention": "1 multiply-add = 1 FLOP, batch 1, matrix products only",
        "full_gflops": round(closed_form_gflops(full), 4),
        "closed_form": {"full": closed_form_gflops(full)},
        "torch_counter": {"full": counted_gflops(full)},
    }
    if condensed is not None:
        report["condensed_gflops"] = round(closed_form_gflops(condensed), 4)
        report["closed_form"]["condensed"] = closed_form_gflops(condensed)
        report["closed_form"]["condensed_with_anchor"] = closed_form_gflops(condensed, True)
        report["torch_counter"]["condensed_with_anchor"] = counted_gflops(condensed)
        report["ratio"] = report["closed_form"]["condensed"] / report["closed_form"]["full"]
    else:
        report["condensed_gflops"] = report["full_gflops"]
    return report


def drop_rate_for_gflops(
    visual: torch.nn.Module, config: CondensationConfig, target_gflops: float, step: float = 0.001
) -> float:
    """The smallest drop rate (largest token budget) whose closed-form GFLOPs meet the target.

    Scans r in ``step`` increments; schedules that cannot be built at a given r are skipped.
    Raises ScheduleError when no drop rate reaches the target.
    """
    full = closed_form_gflops(CondensingVisionTower(visual, None))
    if target_gflops >= full:
        raise ScheduleError(
            f"--target-gflops {target_gflops} is not below the full tower's {full:.2f} GFLOPs"
        )
    lowest = full
    for index in range(1, int(round(1.0 / step))):
        rate = round(index * step, 6)
        try:
            tower = CondensingVisionTower(visual, replace(config, drop_rate=rate))
        except ScheduleError:
            continue
        gflops = closed_form_gflops(tower)
        lowest = min(lowest, gflops)
        if gflops <= target_gflops:
            return rate
    raise ScheduleError(
        f"no drop rate reaches {target_gflops} GFLOPs with these reduction layers and "
        f"{config.merge_centers} merge centres (lowest reachable: {lowest:.2f})"
    )
