"""A plain, literal eager implementation of TCA's condensing ViT, written straight from spec/tca.md.

Used only by tests, to prove that the static-graph tower computes the same tokens and outputs.
One image at a time, Python loops and lists, boolean indexing, stable sorting, and open_clip's own
nn.MultiheadAttention (need_weights=True) for the attention probabilities: nothing is shared with
vlm_export.models.condense except the model weights.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

KEPT, MERGED, PRUNED, GONE = 0, 1, 2, -1


def schedule_counts(tokens_in: int, drop_rate: float, centers: int) -> tuple[int, int, int]:
    """(keep, merge, prune) from spec 2: left = ceil((1-r) n), m = N - left."""
    n = tokens_in - 1
    left = math.ceil(round((1 - drop_rate) * n, 9))
    m = tokens_in - left
    return left - 2 * m, 2 * m, n - left


def consensus_scores(attn: torch.Tensor) -> torch.Tensor:
    """s_i = mean_h rank_h(i), rank_h(i) = #{j : a[h, j] < a[h, i]} (loops)."""
    heads, n = attn.shape
    scores = torch.zeros(n, dtype=torch.float64)
    for i in range(n):
        total = 0
        for h in range(heads):
            total += int((attn[h] < attn[h, i]).sum())
        scores[i] = total / heads
    return scores


def coreset_merge(tokens: torch.Tensor, centers: int) -> torch.Tensor:
    """Spec 2.3 with loops: greedy k-centre from token 0, nearest-centre clusters, 1/d weights."""
    count = tokens.shape[0]
    chosen = [0]
    for _ in range(centers - 1):
        best, best_dist = 0, -1.0
        for j in range(count):
            nearest = min(float(torch.linalg.norm(tokens[j] - tokens[c])) for c in chosen)
            if nearest > best_dist:
                best, best_dist = j, nearest
        chosen.append(best)
    clusters: list[list[int]] = [[] for _ in chosen]
    for j in range(count):
        dists = [float(torch.linalg.norm(tokens[j] - tokens[c])) for c in chosen]
        clusters[dists.index(min(dists))].append(j)
    merged = []
    for k, centre in enumerate(chosen):
        members = clusters[k] or [centre]
        weights = []
        for j in members:
            dist = float(torch.linalg.norm(tokens[j] - tokens[centre]))
            weights.append(1.0 if dist == 0 else 1.0 / dist)
        total = sum(weights)
        merged.append(sum(w / total * tokens[j] for w, j in zip(weights, members, strict=True)))
    return torch.stack(merged)


def reduction_block(block, x, anchor, drop_rate, centers, ranking, ids, num_patches):
    """One reduction block on one image. x [N, D]; anchor [D] or None; ids: original patch ids."""
    seq = x if anchor is None else torch.cat([anchor[None], x])
    h = block.ln_1(seq)[None]
    out, weights = block.attn(h, h, h, need_weights=True, average_attn_weights=False)
    offset = 0 if anchor is None else 1
    out, weights = (
        out[0, offset:],
        weights[0, :, offset:, offset:],
    )  # drop anchor row/col, no renorm
    x = x + block.ls_1(out)
    attn = weights[:, 0, 1:]  # [H, n]: CLS query to patch keys
    abar = attn.mean(0)
    scores = abar if ranking == "mean" else consensus_scores(attn).float()
    order = torch.argsort(-scores, stable=True)
    keep, merge, prune = schedule_counts(x.shape[0], drop_rate, centers)
    patches = x[1:]
    keep_idx, merge_idx, prune_idx = order[:keep], order[keep : keep + merge], order[keep + merge :]
    pruned_token = torch.zeros(x.shape[1], dtype=x.dtype)
    for i in prune_idx.tolist():
        pruned_token = pruned_token + abar[i].to(x.dtype) * patches[i]
    merged = coreset_merge(patches[merge_idx], centers)
    fate = torch.full((num_patches,), GONE, dtype=torch.int32)
    for code, index in ((KEPT, keep_idx), (MERGED, merge_idx), (PRUNED, prune_idx)):
        for i in index.tolist():
            if ids[i] >= 0:
                fate[ids[i]] = code
    x = torch.cat([x[:1], patches[keep_idx], merged, pruned_token[None]])
    ids = [ids[i] for i in keep_idx.tolist()] + [-1] * (centers + 1)
    x = x + block.ls_2(block.mlp(block.ln_2(x[None])))[0]
    return x, ids, fate


def choose_anchor(cls_token, class_anchors, valid):
    """argmax over valid classes of cos(A[c], x_cls); None when no class is valid."""
    best, best_cos = None, -2.0
    for c in range(class_anchors.shape[0]):
        if valid[c] <= 0:
            continue
        cos = float(F.cosine_similarity(class_anchors[c], cls_token, dim=0))
        if cos > best_cos:
            best, best_cos = c, cos
    return None if best is None else class_anchors[best]


@torch.no_grad()
def reference_forward(visual, image, drop_rate, centers, ranking, reduction_layers, anchors, valid):
    """One image [3, H, W] -> (embedding [E] normalised, cls stack [L, D], fates [R, P]).

    anchors [C, R, D] and valid [C] as the engine takes them; valid all zero = no anchors.
    """
    x = visual._embeds(image[None])[0]
    num_patches = x.shape[0] - 1
    ids = list(range(num_patches))
    cls_stack, fates = [], []
    for index, block in enumerate(visual.transformer.resblocks):
        if index in reduction_layers:
            slot = reduction_layers.index(index)
            anchor = choose_anchor(x[0], anchors[:, slot], valid)
            x, ids, fate = reduction_block(
                block, x, anchor, drop_rate, centers, ranking, ids, num_patches
            )
            fates.append(fate)
        else:
            x = block(x[None])[0]
        cls_stack.append(x[0])
    pooled = visual.ln_post(x[0]) @ visual.proj
    return F.normalize(pooled, dim=0), torch.stack(cls_stack), torch.stack(fates)
