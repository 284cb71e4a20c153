"""The static token schedule of TCA condensation (spec/tca.md section 2), computed in plain Python.

Every count depends only on (tokens in, drop rate, merge centres), so the whole schedule is known
at export time: it fixes the shapes of the graph and is recorded in the manifest.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from vlm_export.core.errors import UserError

RANKINGS = ("mean", "consensus")


class ScheduleError(UserError):
    """A condensation configuration that cannot be built (impossible budget, bad layers)."""


@dataclass(frozen=True)
class CondensationConfig:
    """What the user chooses: per-layer drop rate r, merge centres K, ranking, reduction blocks.

    ``reduction_layers`` None means the reference positions scaled to the depth (L/4, L/2, 3L/4).
    ``topk_free`` builds the same condensation without TopK or gathers (``rank_free``), for NPU
    runtimes that lack them.
    """

    drop_rate: float = 0.035
    merge_centers: int = 2
    ranking: str = "mean"
    reduction_layers: tuple[int, ...] | None = None
    topk_free: bool = False

    @property
    def graph(self) -> str:
        """The manifest's ``engine.condensation_graph``: "topk" or "topk-free"."""
        return "topk-free" if self.topk_free else "topk"

    def resolved_layers(self, depth: int) -> tuple[int, ...]:
        """The reduction block indices for a tower of ``depth`` blocks, validated."""
        layers = (
            default_reduction_layers(depth)
            if self.reduction_layers is None
            else tuple(self.reduction_layers)
        )
        if not layers:
            raise ScheduleError("no reduction layers given")
        bad = [layer for layer in layers if not 0 <= layer < depth]
        if bad:
            raise ScheduleError(
                f"reduction layers {bad} are out of range: the tower has blocks 0..{depth - 1}"
            )
        if list(layers) != sorted(set(layers)):
            raise ScheduleError(f"reduction layers must be distinct and increasing, got {layers}")
        if layers[0] == 0:
            raise ScheduleError(
                "reduction layer 0 has no block before it to provide the anchor CLS token; "
                "use layers >= 1"
            )
        return layers


@dataclass(frozen=True)
class LayerCounts:
    """Token counts of one reduction block (N in, keep / merge / prune sets, N' out)."""

    layer: int
    tokens_in: int
    keep: int
    merge: int
    prune: int
    merge_centers: int

    @property
    def passthrough(self) -> bool:
        """True for drop rate 0: every token is kept, no merged or fused token is added."""
        return self.merge == 0 and self.prune == 0

    @property
    def tokens_out(self) -> int:
        if self.passthrough:
            return 1 + self.keep
        return 1 + self.keep + self.merge_centers + 1

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "tokens_out": self.tokens_out}


def default_reduction_layers(depth: int) -> tuple[int, ...]:
    """Blocks at the reference relative depths L/4, L/2, 3L/4 (3, 6, 9 for 12 blocks)."""
    layers = sorted({round(depth * fraction) for fraction in (0.25, 0.5, 0.75)})
    return tuple(layer for layer in layers if 1 <= layer < depth)


def layer_counts(layer: int, tokens_in: int, drop_rate: float, merge_centers: int) -> LayerCounts:
    """Counts for one reduction block; raise ScheduleError naming the layer if impossible.

    Drop rate 0 is the pass-through block of a ladder's full-budget rung: it keeps every token
    (and still injects the anchor and ranks nothing), so its tokens out equal its tokens in.
    """
    n = tokens_in - 1
    if drop_rate == 0.0:
        return LayerCounts(layer, tokens_in, keep=n, merge=0, prune=0, merge_centers=merge_centers)
    # round away float noise before ceil: (1 - 0.035) * 196 must not become 189.14000000000001
    left = math.ceil(round((1.0 - drop_rate) * n, 9))
    m = tokens_in - left
    counts = LayerCounts(
        layer=layer,
        tokens_in=tokens_in,
        keep=left - 2 * m,
        merge=2 * m,
        prune=n - left,
        merge_centers=merge_centers,
    )
    if min(counts.keep, counts.merge, counts.prune) < 0 or counts.keep < 1:
        raise ScheduleError(
            f"impossible token budget at block {layer}: {tokens_in} tokens in, drop rate "
            f"{drop_rate} gives keep={counts.keep}, merge={counts.merge}, prune={counts.prune}; "
            "use a smaller drop rate or fewer reduction layers"
        )
    if counts.merge < merge_centers:
        raise ScheduleError(
            f"block {layer}: the merge set has {counts.merge} tokens, fewer than the "
            f"{merge_centers} merge centres; use a larger drop rate or fewer centres"
        )
    if counts.tokens_out >= tokens_in:
        raise ScheduleError(
            f"drop rate {drop_rate} does not condense at block {layer}: {tokens_in} tokens in, "
            f"{counts.tokens_out} out (keep={counts.keep}, merge={counts.merge} into "
            f"{merge_centers}, prune={counts.prune}); use a larger drop rate or fewer centres"
        )
    return counts


def token_schedule(
    num_tokens: int, depth: int, config: CondensationConfig
) -> tuple[list[LayerCounts], list[int]]:
    """Counts at each reduction block and the number of tokens entering every block."""
    if not 0.0 <= config.drop_rate < 1.0:
        raise ScheduleError(f"drop rate must be in [0, 1), got {config.drop_rate}")
    if config.merge_centers < 1:
        raise ScheduleError(f"merge centres must be >= 1, got {config.merge_centers}")
    if config.ranking not in RANKINGS:
        raise ScheduleError(f"ranking must be one of {RANKINGS}, got {config.ranking!r}")
    layers = set(config.resolved_layers(depth))
    schedule: list[LayerCounts] = []
    tokens_per_block: list[int] = []
    tokens = num_tokens
    for block in range(depth):
        tokens_per_block.append(tokens)
        if block in layers:
            counts = layer_counts(block, tokens, config.drop_rate, config.merge_centers)
            schedule.append(counts)
            tokens = counts.tokens_out
    return schedule, tokens_per_block


def anchor_layers(reduction_layers: Sequence[int]) -> list[int]:
    """cls_per_layer rows whose class means feed each reduction block (the block before it)."""
    return [layer - 1 for layer in reduction_layers]
