"""TopK-free, index-free condensation ops for NPU runtimes (RKNN, ncnn) that have no TopK.

The same condensation as ``condense`` (spec/tca.md 2.1-2.3), with every data-dependent selection
written in float arithmetic and one-hot matrix products, so that no integer or boolean tensor
exists (ncnn has none; RKNN puts every op with one on the CPU):

- a > b as ceil(clip(a - b, 0, 1)): exactly 1.0 or 0.0, no Greater or Cast;
- ranks from pairwise comparisons with the token index as tie-breaker, exactly TopK's order
  (ONNX TopK puts the lower index first among equal values);
- the sort as a permutation matrix P[b, r, i] = (rank_i == r), and every gather as P @ tokens;
- ArgMax/ArgMin as the one-hot of the first maximum (ReduceMax, no index output);
- one-hot vectors as relu(1 - |value - position|) on exact small integers.

No TopK, Gather, GatherElements, ScatterND, Equal, Where, CumSum, ArgMax or ArgMin remains. A
one-hot product copies its row exactly (x * 1 plus zeros), so the kept, merged and fused tokens
are bit-for-bit those of the TopK graph.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from vlm_export.models.condense import distance_to


def greater(a: Tensor, b: Tensor) -> Tensor:
    """[a > b] as 0.0/1.0 in a's dtype, exact: the ceiling of a - b clipped to [0, 1]."""
    return torch.ceil(torch.clamp(a - b, 0.0, 1.0))


def token_scores(cls_attn: Tensor, ranking: str) -> Tensor:
    """``condense.token_scores`` (same values) with the consensus comparisons as ``greater``."""
    if ranking == "mean":
        return cls_attn.mean(dim=1)
    n = cls_attn.shape[-1]
    rank_sum = greater(cls_attn.unsqueeze(-1), cls_attn.unsqueeze(-2)).sum(dim=-1).sum(dim=1)
    tie_break = torch.arange(n - 1, -1, -1, dtype=cls_attn.dtype, device=cls_attn.device)
    return rank_sum * n + tie_break


def descending_ranks(scores: Tensor) -> Tensor:
    """Rank of each score in descending order [B, n] (float, exact integers), ties by index.

    rank_i = #{j: s_j > s_i} + #{j < i: s_j == s_i}. With M[i, j] = [j > i] * [s_j > s_i]
    (a later token that scores higher), rank_i = sum_j M[i, j] + i - sum_j M[j, i]: the second
    sum counts the earlier tokens that score strictly lower, the rest of the i earlier tokens
    score higher or equal. One Greater, one constant mask.
    """
    n = scores.shape[-1]
    later = torch.from_numpy(np.triu(np.ones((n, n), np.float32), 1))  # a constant, not Trilu
    later = later.to(scores.dtype).to(scores.device)
    higher = greater(scores.unsqueeze(-2), scores.unsqueeze(-1))  # [B, i, j] = s_j > s_i
    beaten = later * higher
    position = torch.arange(n, dtype=scores.dtype, device=scores.device)
    return beaten.sum(dim=-1) + position - beaten.sum(dim=-2)


def one_hot(values: Tensor, size: int) -> Tensor:
    """values [...] holding exact integers (as floats) -> [..., size]: 1.0 where value == column.

    relu(1 - |value - column|) is exactly 1 or 0 for integers; a value outside 0..size-1 (the -1
    of tokens made by earlier blocks) gives an all-zero row.
    """
    columns = torch.arange(size, dtype=values.dtype, device=values.device)
    return torch.relu(1.0 - (values.unsqueeze(-1) - columns).abs())


def first_max(values: Tensor) -> Tensor:
    """One-hot [..., n] of ``values.argmax(-1)`` (the first maximum on ties), without ArgMax.

    hit = (value == max); the first hit's index = n - max(hit * (n - index)).
    """
    n = values.shape[-1]
    hit = 1.0 - greater(values.amax(dim=-1, keepdim=True), values)
    countdown = torch.arange(n, 0, -1, dtype=values.dtype, device=values.device)
    first = n - (hit * countdown).amax(dim=-1)
    return one_hot(first, n)


def sort_matrix(scores: Tensor) -> Tensor:
    """Permutation P [B, n, n] with P[b, r, i] = 1 when token i is r-th by descending score.

    ``P @ tokens`` is ``tokens`` in the order ``torch.topk(scores, n).indices`` takes them on
    ONNX Runtime (equal scores: lower index first).
    """
    return one_hot(descending_ranks(scores), scores.shape[-1]).transpose(1, 2)


def take(rows: Tensor, values: Tensor) -> Tensor:
    """One-hot rows [B, k, n] applied to values [B, n] or [B, n, D] -> [B, k] or [B, k, D]."""
    if values.dim() == 2:
        return (rows @ values.unsqueeze(-1)).squeeze(-1)
    return rows @ values


def fuse_pruned(patches: Tensor, head_mean_attn: Tensor, prune_rows: Tensor) -> Tensor:
    """``condense.fuse_pruned`` with the prune set as one-hot rows [B, p, n] -> [B, 1, D].

    Weighted tokens are summed in score order, as the TopK graph sums them (same bits).
    """
    if prune_rows.shape[1] == 0:
        return patches.new_zeros(patches.shape[0], 1, patches.shape[-1])
    weights = take(prune_rows, head_mean_attn).unsqueeze(-1)
    return (weights * take(prune_rows, patches)).sum(dim=1, keepdim=True)


def merge_coreset(tokens: Tensor, centers: int) -> Tensor:
    """``condense.merge_coreset`` with one-hot picks only: [B, m, D] -> [B, K, D].

    Same steps (first centre = highest score, K-1 farthest-point steps, nearest centre with the
    lowest centre index on ties, 1/distance weights, the centre 1.0, an empty cluster takes its
    centre alone); each pick is a one-hot row, so every value equals the gather version's.
    """
    m = tokens.shape[1]
    centre_rows = [one_hot(tokens.new_zeros(tokens.shape[0]), m)]  # [B, m]
    distances = [distance_to(tokens, tokens[:, :1].squeeze(1))]
    nearest = distances[0]
    for _ in range(centers - 1):
        row = first_max(nearest)  # the farthest token
        centre_rows.append(row)
        distances.append(distance_to(tokens, take(row.unsqueeze(1), tokens).squeeze(1)))
        nearest = torch.minimum(nearest, distances[-1])
    table = torch.stack(distances, dim=-1)  # [B, m, K]
    assign = first_max(-table)  # [B, m, K]: the nearest centre
    own_distance = (table * assign).sum(dim=-1)
    at_centre = 1.0 - greater(own_distance, torch.zeros_like(own_distance))  # distance 0
    weight = 1.0 / (own_distance + at_centre)  # exactly 1/d, or 1.0 for the centre
    members = assign.transpose(1, 2)  # [B, K, m]
    empty = torch.relu(1.0 - members.sum(dim=-1, keepdim=True))  # member counts are integers
    matrix = members * weight.unsqueeze(1) + empty * torch.stack(centre_rows, dim=1)
    matrix = matrix / matrix.sum(dim=-1, keepdim=True)
    return matrix @ tokens


def patch_fate(token_fate: Tensor, patch_ids: Tensor, num_patches: int) -> Tensor:
    """Per original patch [B, num_patches] from each current token's fate [B, n], as float
    (the tower casts all blocks' fates to int32 at once; ncnn has no integer tensors).

    ``patch_ids`` [B, n] (-1 for tokens made by earlier blocks) are in the tokens' own order, so
    no sorted ids are needed: fate of patch p = fate of the token whose id is p, or -1.
    """
    match = one_hot(patch_ids, num_patches)  # [B, n, P]
    fate_plus_one = (match * (token_fate + 1.0).unsqueeze(-1)).sum(dim=1)
    return fate_plus_one - 1.0
