"""Static-graph token condensation ops (spec/tca.md 2.1-2.3): rank, partition, fuse, merge.

Every function works on a batch with shapes fixed by the token schedule: constant-k TopK and
GatherElements, one-hot matrix products, ArgMax/ArgMin on small tables. No Python loop over data,
no ``.item()``, no boolean indexing, no NonZero, no scatter; loops run over the static K only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vlm_export.core.manifest import TOKEN_FATE
from vlm_export.models.schedule import LayerCounts


def token_scores(cls_attn: Tensor, ranking: str) -> Tensor:
    """Scores [B, n] from the CLS attention rows [B, H, n]; higher = more important.

    "mean": head-mean attention (released code). "consensus": sum over heads of each token's rank
    (0 = least attended; rank_h(i) = #{j: a[h, j] < a[h, i]}), which orders tokens exactly as the
    paper's mean rank. Consensus scores tie often, so they are made unique with the token index
    (ties go to the lower index), which keeps TopK's order defined on every backend.
    """
    if ranking == "mean":
        return cls_attn.mean(dim=1)
    n = cls_attn.shape[-1]
    ranks = (cls_attn.unsqueeze(-2) < cls_attn.unsqueeze(-1)).to(cls_attn.dtype).sum(dim=-1)
    rank_sum = ranks.sum(dim=1)
    tie_break = torch.arange(n - 1, -1, -1, dtype=cls_attn.dtype, device=cls_attn.device)
    return rank_sum * n + tie_break


def gather_tokens(tokens: Tensor, index: Tensor) -> Tensor:
    """tokens [B, n, D] gathered at index [B, k] -> [B, k, D]."""
    return torch.gather(tokens, 1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def fuse_pruned(patches: Tensor, head_mean_attn: Tensor, prune_index: Tensor) -> Tensor:
    """One token [B, 1, D]: sum of pruned tokens weighted by head-mean CLS attention (no renorm)."""
    if prune_index.shape[1] == 0:
        return patches.new_zeros(patches.shape[0], 1, patches.shape[-1])
    weights = torch.gather(head_mean_attn, 1, prune_index).unsqueeze(-1)
    return (weights * gather_tokens(patches, prune_index)).sum(dim=1, keepdim=True)


def distance_to(tokens: Tensor, centre: Tensor) -> Tensor:
    """Euclidean distance of tokens [B, m, D] to one centre [B, D] -> [B, m]."""
    return (tokens - centre.unsqueeze(1)).pow(2).sum(dim=-1).sqrt()


def merge_coreset(tokens: Tensor, centers: int) -> Tensor:
    """K-centre coreset averaging of the merge set [B, m, D] (sorted by score) -> [B, K, D].

    1. k-centre greedy: first centre = the highest-scoring merge token (index 0, deterministic;
       the released code draws it at random), then K-1 farthest-point steps (ArgMax, first on ties).
    2. every token goes to its nearest centre (ArgMin, lowest centre index on ties).
    3. weights 1/||x - c||, the centre itself (distance 0) 1.0, normalised per cluster;
       merged = W @ X as a [K, m] one-hot weight matrix. A cluster left empty (its centre duplicates
       an earlier one) takes its centre token alone.
    """
    batch, m, _ = tokens.shape
    centre_index = [torch.zeros(batch, dtype=torch.long, device=tokens.device)]
    distances = [distance_to(tokens, tokens[:, 0])]
    nearest = distances[0]
    for _ in range(centers - 1):
        farthest = nearest.argmax(dim=1)
        centre = gather_tokens(tokens, farthest.unsqueeze(1)).squeeze(1)
        centre_index.append(farthest)
        distances.append(distance_to(tokens, centre))
        nearest = torch.minimum(nearest, distances[-1])
    table = torch.stack(distances, dim=-1)  # [B, m, K]
    assign = table.argmin(dim=-1)  # [B, m]
    own_distance = torch.gather(table, 2, assign.unsqueeze(-1)).squeeze(-1)
    weight = 1.0 / torch.where(own_distance > 0, own_distance, torch.ones_like(own_distance))
    cluster_ids = torch.arange(centers, device=tokens.device).view(1, centers, 1)
    members = (assign.unsqueeze(1) == cluster_ids).to(tokens.dtype)  # [B, K, m]
    token_ids = torch.arange(m, device=tokens.device).view(1, 1, m)
    centre_onehot = (torch.stack(centre_index, dim=1).unsqueeze(-1) == token_ids).to(tokens.dtype)
    empty = (members.sum(dim=-1, keepdim=True) == 0).to(tokens.dtype)
    matrix = members * weight.unsqueeze(1) + empty * centre_onehot
    matrix = matrix / matrix.sum(dim=-1, keepdim=True)
    return matrix @ tokens


def fate_codes(counts: LayerCounts, device: torch.device) -> Tensor:
    """TOKEN_FATE code of each position of the score-sorted patch order: kept, merged, pruned."""
    codes = [TOKEN_FATE["kept"]] * counts.keep + [TOKEN_FATE["merged"]] * counts.merge
    codes += [TOKEN_FATE["pruned"]] * counts.prune
    return torch.tensor(codes, dtype=torch.float32, device=device)


def patch_fate(sorted_ids: Tensor, codes: Tensor, num_patches: int) -> Tensor:
    """Per original patch [B, num_patches] int32: its fate at this block, or -1 if already gone.

    ``sorted_ids`` [B, n] holds the original patch index of each current token in score order
    (-1 for merged/fused tokens made by earlier blocks). Static: a one-hot comparison, no scatter.
    """
    patch_ids = torch.arange(num_patches, device=sorted_ids.device, dtype=sorted_ids.dtype)
    match = (sorted_ids.unsqueeze(-1) == patch_ids).to(codes.dtype)  # [B, n, P]
    fate_plus_one = (match * (codes + 1.0).view(1, -1, 1)).sum(dim=1)
    return (fate_plus_one - 1.0).to(torch.int32)
