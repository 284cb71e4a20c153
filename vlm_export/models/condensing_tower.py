"""The traceable image tower: open_clip's ViT with TCA condensation and anchor injection.

``CondensingVisionTower`` wraps an open_clip ``VisionTransformer`` without copying its weights.
Ordinary blocks run open_clip's own block (fused attention). Reduction blocks compute attention
explicitly, because the CLS row of the probabilities ranks the tokens (spec/tca.md 2.1), with one
extra key/value: the anchor chosen from the reservoir (2.4). The engine always takes the anchors
input; an all-zero ``anchors_valid`` masks the anchor key, which is exactly ordinary attention.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlm_export.core.errors import UserError
from vlm_export.models import rank_free
from vlm_export.models.condense import (
    fate_codes,
    fuse_pruned,
    gather_tokens,
    merge_coreset,
    patch_fate,
    token_scores,
)
from vlm_export.models.schedule import CondensationConfig, LayerCounts, token_schedule

# Added to the anchor's attention logit when no anchor is valid. exp(-1e4) is exactly 0 in fp32
# and fp16, and 1e4 is representable in fp16, so masked attention equals attention over N tokens.
MASK_BIAS = 1.0e4


class UnsupportedModelError(UserError):
    """The image tower is not a plain CLS-pooled open_clip ViT."""


def check_vit(visual: nn.Module) -> None:
    """Refuse towers TCA cannot condense (no transformer, attention pooling, mean pooling)."""
    needed = ("conv1", "class_embedding", "positional_embedding", "transformer", "ln_post")
    missing = [name for name in needed if not hasattr(visual, name)]
    if missing:
        raise UnsupportedModelError(
            f"image tower {type(visual).__name__} is not an open_clip ViT (no {', '.join(missing)})"
        )
    if getattr(visual, "attn_pool", None) is not None:
        raise UnsupportedModelError("towers with attention pooling are not supported")
    if getattr(visual, "pool_type", "tok") != "tok":
        raise UnsupportedModelError(
            f"TCA needs CLS-token pooling; this tower pools with {visual.pool_type!r}"
        )
    block = visual.transformer.resblocks[0]
    if not isinstance(getattr(block, "attn", None), nn.MultiheadAttention):
        raise UnsupportedModelError("blocks without nn.MultiheadAttention are not supported")


def tower_geometry(visual: nn.Module) -> dict[str, int]:
    """Image size, patch size, width, depth, heads, tokens and embedding size of a ViT tower."""
    blocks = visual.transformer.resblocks
    image_size = visual.image_size
    patch_size = visual.patch_size
    grid = (image_size[0] // patch_size[0]) * (image_size[1] // patch_size[1])
    return {
        "image_size": int(image_size[0]),
        "patch_size": int(patch_size[0]),
        "width": int(visual.transformer.width),
        "layers": len(blocks),
        "heads": int(blocks[0].attn.num_heads),
        "num_patches": int(grid),
        "num_tokens": int(grid) + 1,
        "embed_dim": int(visual.output_dim),
    }


def _split_heads(x: Tensor, heads: int) -> Tensor:
    batch, length, width = x.shape
    return x.view(batch, length, heads, width // heads).transpose(1, 2)


class AnchoredScores(nn.Module):
    """A reduction block's attention probabilities softmax(q k^T / sqrt(d) + bias) (spec 2.2).

    No weights. Its CLS row ranks the tokens, so its ONNX nodes share the prefix
    ``/anchored_scores/`` (``_1``, ... per reduction block), which fp16 TensorRT builds keep in
    fp32 and INT8 graphs leave in float: near-tied scores must keep their order.
    """

    def __init__(self, head_dim: int):
        super().__init__()
        self.scale = 1.0 / math.sqrt(head_dim)

    def forward(self, q: Tensor, k: Tensor, bias: Tensor) -> Tensor:
        """q [B, H, N, d], k [B, H, M, d], additive bias [M] -> probabilities [B, H, N, M]."""
        return torch.softmax((q @ k.transpose(-2, -1)) * self.scale + bias, dim=-1)


def attention_with_anchor(
    block: nn.Module, x: Tensor, anchor: Tensor, key_bias: Tensor, scores: AnchoredScores
):
    """Attention of a block over [anchor, x] with the anchor's query row dropped.

    x [B, N, D], anchor [B, D], key_bias: scalar added to the anchor key's logits (0 or -1e4),
    ``scores`` the tower's AnchoredScores. Returns (attention output [B, N, D] before the
    residual, probabilities [B, H, N, N+1]).
    """
    attn: nn.MultiheadAttention = block.attn
    heads = attn.num_heads
    width = x.shape[-1]
    sequence = block.ln_1(torch.cat([anchor.unsqueeze(1), x], dim=1))
    w_q, w_k, w_v = attn.in_proj_weight.split(width)
    b_q, b_k, b_v = attn.in_proj_bias.split(width)
    q = _split_heads(F.linear(sequence[:, 1:], w_q, b_q), heads)
    k = _split_heads(F.linear(sequence, w_k, b_k), heads)
    v = _split_heads(F.linear(sequence, w_v, b_v), heads)
    bias = torch.cat([key_bias.reshape(1), key_bias.new_zeros(x.shape[1])])
    probs = scores(q, k, bias)
    out = (probs @ v).transpose(1, 2).reshape(x.shape)
    return attn.out_proj(out), probs


class AnchorSelector(nn.Module):
    """Picks the valid class anchor most cosine-similar to each image's CLS token (spec 2.4).

    A module (without weights) so that its ONNX nodes share the name prefix ``/anchor_select/``
    (``/anchor_select_1/``, ... per reduction block), which fp16 TensorRT builds keep in fp32
    (cosines and the -1e4 masking need fp32 range). ``gather_free`` picks the row as a one-hot
    product instead of a Gather (the TopK-free graph).
    """

    def __init__(self, gather_free: bool = False):
        super().__init__()
        self.gather_free = gather_free

    def forward(self, cls_token: Tensor, class_anchors: Tensor, valid: Tensor):
        """-> (anchor [B, D], key bias: 0 if any class is valid, else -1e4)."""
        if self.gather_free:
            return self._one_hot_pick(cls_token, class_anchors, valid)
        cosine = F.normalize(cls_token, dim=-1) @ F.normalize(class_anchors, dim=-1).T
        choice = (cosine + (valid - 1.0) * MASK_BIAS).argmax(dim=-1)
        return class_anchors.index_select(0, choice), (valid.max() - 1.0) * MASK_BIAS

    def _one_hot_pick(self, cls_token: Tensor, class_anchors: Tensor, valid: Tensor):
        """The anchor as a one-hot product (no ArgMax, no Gather). Batch 1 goes through 1-D
        tensors: ncnn's converter takes every tensor that meets the image in a MatMul as batched,
        and would then cut the anchors' class axis as if it were the batch."""
        anchors_unit = F.normalize(class_anchors, dim=-1)
        if cls_token.shape[0] == 1:
            cosine = F.normalize(cls_token.reshape(-1), dim=0) @ anchors_unit.T  # [K]
        else:
            cosine = F.normalize(cls_token, dim=-1) @ anchors_unit.T  # [B, K]
        rows = rank_free.first_max(cosine + (valid - 1.0) * MASK_BIAS)
        anchor = (rows @ class_anchors).reshape(cls_token.shape[0], -1)
        return anchor, (valid.max() - 1.0) * MASK_BIAS


class TokenCondenser(nn.Module):
    """One reduction block's condensation (spec 2.1-2.3): rank, partition, fuse, merge.

    No weights. Its ONNX nodes share the prefix ``/condensers.<i>/``, which fp16 TensorRT builds
    keep in fp32: rank sums, distances and the weighted sums overflow or lose order in fp16.
    """

    def __init__(self, counts: LayerCounts, ranking: str, num_patches: int):
        super().__init__()
        self.counts = counts
        self.ranking = ranking
        self.num_patches = num_patches

    def forward(self, x: Tensor, cls_attn: Tensor, patch_ids: Tensor):
        """x [B, N, D] after attention, cls_attn [B, H, n] -> (x' [B, N', D], ids, fate)."""
        counts = self.counts
        if counts.passthrough:  # drop rate 0: every token stays, in its order
            return (
                x,
                patch_ids,
                patch_fate(patch_ids, fate_codes(counts, x.device), self.num_patches),
            )
        scores = token_scores(cls_attn, self.ranking)
        order = torch.topk(scores, k=scores.shape[1], dim=1, largest=True, sorted=True).indices
        keep_end, merge_end = counts.keep, counts.keep + counts.merge
        patches = x[:, 1:]
        kept = gather_tokens(patches, order[:, :keep_end])
        merge_set = gather_tokens(patches, order[:, keep_end:merge_end])
        merged = merge_coreset(merge_set, counts.merge_centers)
        fused = fuse_pruned(patches, cls_attn.mean(dim=1), order[:, merge_end:])
        x = torch.cat([x[:, :1], kept, merged, fused], dim=1)
        sorted_ids = torch.gather(patch_ids, 1, order)
        fate = patch_fate(sorted_ids, fate_codes(counts, x.device), self.num_patches)
        gone = patch_ids.new_full((x.shape[0], counts.merge_centers + 1), -1.0)
        return x, torch.cat([sorted_ids[:, :keep_end], gone], dim=1), fate


class TopKFreeCondenser(TokenCondenser):
    """TokenCondenser without TopK and gathers (``rank_free``): the same tokens, fates and ids.

    The sort is a permutation matrix from pairwise comparisons; every gather is a one-hot MatMul.
    """

    def forward(self, x: Tensor, cls_attn: Tensor, patch_ids: Tensor):
        """x [B, N, D] after attention, cls_attn [B, H, n] -> (x' [B, N', D], ids, fate)."""
        counts = self.counts
        codes = fate_codes(counts, x.device)
        if counts.passthrough:
            token_fate = codes.unsqueeze(0).expand(x.shape[0], -1)
            return x, patch_ids, rank_free.patch_fate(token_fate, patch_ids, self.num_patches)
        perm = rank_free.sort_matrix(rank_free.token_scores(cls_attn, self.ranking))  # [B, r, i]
        keep_end, merge_end = counts.keep, counts.keep + counts.merge
        patches = x[:, 1:]
        kept = rank_free.take(perm[:, :keep_end], patches)
        merge_set = rank_free.take(perm[:, keep_end:merge_end], patches)
        merged = rank_free.merge_coreset(merge_set, counts.merge_centers)
        fused = rank_free.fuse_pruned(patches, cls_attn.mean(dim=1), perm[:, merge_end:])
        x = torch.cat([x[:, :1], kept, merged, fused], dim=1)
        token_fate = (codes.view(1, 1, -1) @ perm).squeeze(1)  # fate of each token, own order
        fate = rank_free.patch_fate(token_fate, patch_ids, self.num_patches)
        gone = patch_ids.new_full((x.shape[0], counts.merge_centers + 1), -1.0)
        kept_ids = rank_free.take(perm[:, :keep_end], patch_ids)
        return x, torch.cat([kept_ids, gone], dim=1), fate


class CondensingVisionTower(nn.Module):
    """open_clip ViT image tower with static-budget TCA condensation (or none, for a full tower).

    ``num_classes`` is the engine's class capacity K, the rows of its anchors input: a label space
    of C <= K classes fills the first C rows and leaves the others zero with ``anchors_valid`` 0.
    An invalid row is never chosen while a valid one exists (its cosine is pushed down by 1e4) and
    its key is masked when none is valid, so the outputs do not depend on K.

    forward(image [B,3,H,W], anchors [K,R,D], anchors_valid [K]) ->
        embedding [B,E] (L2-normalised), cls_per_layer [B,L,D], token_fate [B,R,P] int32.
    With ``config=None`` the tower is the unmodified ViT:
    forward(image) -> embedding, cls_per_layer.
    """

    def __init__(self, visual: nn.Module, config: CondensationConfig | None, num_classes: int = 1):
        super().__init__()
        check_vit(visual)
        self.visual = visual
        self.config = config
        self.geometry = tower_geometry(visual)
        self.num_classes = num_classes
        self.schedule: list[LayerCounts] = []
        self.tokens_per_block = [self.geometry["num_tokens"]] * self.geometry["layers"]
        if config is not None:
            self.schedule, self.tokens_per_block = token_schedule(
                self.geometry["num_tokens"], self.geometry["layers"], config
            )
        num_patches = self.geometry["num_patches"]
        ranking = config.ranking if config is not None else "mean"
        topk_free = config is not None and config.topk_free
        condenser = TopKFreeCondenser if topk_free else TokenCondenser
        self.condensers = nn.ModuleList(
            condenser(counts, ranking, num_patches) for counts in self.schedule
        )
        self.anchor_select = AnchorSelector(gather_free=topk_free)
        self.anchored_scores = AnchoredScores(self.geometry["width"] // self.geometry["heads"])
        self._condenser_at = {c.counts.layer: c for c in self.condensers}

    @property
    def condensing(self) -> bool:
        return self.config is not None

    @property
    def reduction_layers(self) -> list[int]:
        return [counts.layer for counts in self.schedule]

    def example_inputs(self, batch_size: int = 1) -> tuple[Tensor, ...]:
        """Random inputs of the engine's static shapes (anchors valid for all classes)."""
        size = self.geometry["image_size"]
        image = torch.randn(batch_size, 3, size, size)
        if not self.condensing:
            return (image,)
        shape = (self.num_classes, len(self.schedule), self.geometry["width"])
        return image, torch.randn(shape), torch.ones(self.num_classes)

    def forward(
        self, image: Tensor, anchors: Tensor | None = None, anchors_valid: Tensor | None = None
    ):
        visual = self.visual
        x = visual._embeds(image)
        num_patches = self.geometry["num_patches"]
        patch_ids = torch.arange(num_patches, dtype=x.dtype, device=x.device)
        patch_ids = patch_ids.unsqueeze(0).expand(x.shape[0], -1)
        cls_per_layer, fates = [], []
        for index, block in enumerate(visual.transformer.resblocks):
            condenser = self._condenser_at.get(index)
            if condenser is None:
                x = block(x)
            else:
                slot = len(fates)
                x, patch_ids, fate = self._reduction_block(
                    block, x, patch_ids, condenser, anchors[:, slot], anchors_valid
                )
                fates.append(fate)
            cls_per_layer.append(x[:, 0])
        pooled, _ = visual._pool(x)
        if visual.proj is not None:
            pooled = pooled @ visual.proj
        outputs = (F.normalize(pooled, dim=-1), torch.stack(cls_per_layer, dim=1))
        if self.condensing:
            fate = torch.stack(fates, dim=1)
            # the TopK-free condensers give float fates (for ncnn): one cast for all blocks
            outputs += (fate if fate.dtype == torch.int32 else fate.to(torch.int32),)
        return outputs

    def _reduction_block(
        self,
        block: nn.Module,
        x: Tensor,
        patch_ids: Tensor,
        condenser: TokenCondenser,
        class_anchors: Tensor,
        valid: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        anchor, key_bias = self.anchor_select(x[:, 0], class_anchors, valid)
        attended, probs = attention_with_anchor(block, x, anchor, key_bias, self.anchored_scores)
        x = x + block.ls_1(attended)
        cls_attn = probs[:, :, 0, 2:]  # CLS query, patch keys; anchor column dropped, no renorm
        x, patch_ids, fate = condenser(x, cls_attn, patch_ids)
        x = x + block.ls_2(block.mlp(block.ln_2(x)))
        return x, patch_ids, fate
