"""open_clip's text tower as a traceable module whose context is only as long as its input.

open_clip runs every prompt through the full context (77 tokens) and pools the output at the
end-of-text token (the largest id, ``argmax``) under a causal mask. Under that mask position t
sees positions <= t only, so the tokens after the longest prompt's EOT (padding) never reach a
pooled output: cutting the context to the longest prompt of a batch (positional embedding and
causal mask sliced to T) gives the same embeddings with far less work (tested to ~1e-6).

``TextTower(model)(tokens [B, T] int64)`` -> L2-normalised text embeddings [B, E] float32, for
any 2 <= T <= context_length. Traced with dynamic B and T axes it becomes the bundle's text engine.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlm_export.core.errors import UserError


class TextTowerUnsupported(UserError):
    """A model whose text tower is not open_clip's causal, argmax-pooled CLIP text transformer."""


def text_tower_problem(model: nn.Module) -> str | None:
    """Why this model's text tower cannot be exported as a TextTower (None when it can)."""
    needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "attn_mask")
    missing = [name for name in needed if getattr(model, name, None) is None]
    if missing:
        return (
            f"its text tower is not open_clip's built-in CLIP text transformer (no "
            f"{', '.join(missing)}; e.g. a Hugging Face text model)"
        )
    pool = getattr(model, "text_pool_type", "argmax")
    if pool != "argmax":
        return f"its text tower pools with {pool!r}, not at the end-of-text token (argmax)"
    blocks = model.transformer.resblocks
    if not getattr(model.transformer, "batch_first", True) or not all(
        isinstance(getattr(block, "attn", None), nn.MultiheadAttention)
        and not hasattr(block, "ln_1_kv")
        for block in blocks
    ):
        return "its text blocks are not open_clip's batch-first ResidualAttentionBlocks"
    mask = model.attn_mask
    context = model.positional_embedding.shape[0]
    causal = torch.full((context, context), float("-inf")).triu_(1)
    if mask.shape != causal.shape or not torch.equal(mask.float(), causal):
        return "its text attention mask is not causal"
    return None


def causal_attention(block: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A block's multi-head self-attention written out (x [B, T, D], additive mask [T, T]).

    The same arithmetic as nn.MultiheadAttention, in ops whose shapes stay symbolic when traced
    with free batch and length axes (the module's own path bakes the traced length in).
    """
    q, k, v = split_heads(block, x)
    return attend(block, q, k, v, mask)


def split_heads(block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Queries, keys and values of x [B, T, D] for a block's attention, each [B, H, T, D/H]."""
    attn: nn.MultiheadAttention = block.attn
    batch, length, width = x.shape
    q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).split(width, dim=-1)
    return tuple(t.reshape(batch, length, attn.num_heads, -1).transpose(1, 2) for t in (q, k, v))


def attend(
    block: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Scaled dot-product attention of q [B, H, S, d] over k, v [B, H, K, d] (additive mask
    broadcast to [B, H, S, K]), heads joined and projected: [B, S, H * d]."""
    batch, heads, length, head_width = q.shape
    logits = (q * (1.0 / math.sqrt(head_width))) @ k.transpose(-2, -1) + mask
    out = (torch.softmax(logits, dim=-1) @ v).transpose(1, 2).reshape(batch, length, -1)
    return block.attn.out_proj(out)


class TextTower(nn.Module):
    """Tokens [B, T] int64 -> L2-normalised text embedding [B, E], context cut to T."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        problem = text_tower_problem(model)
        if problem:
            raise TextTowerUnsupported(f"cannot export the text engine: {problem}")
        self.token_embedding = model.token_embedding
        self.positional_embedding = model.positional_embedding
        self.transformer = model.transformer
        self.ln_final = model.ln_final
        self.text_projection = model.text_projection
        self.register_buffer("causal_mask", model.attn_mask.detach().clone(), persistent=False)

    @property
    def context_length(self) -> int:
        """The model's full context (77 for CLIP)."""
        return int(self.positional_embedding.shape[0])

    @property
    def embed_dim(self) -> int:
        """Width of the output embedding E."""
        projection = self.text_projection
        if isinstance(projection, nn.Linear):
            return int(projection.out_features)
        if projection is None:
            return int(self.positional_embedding.shape[1])
        return int(projection.shape[1])

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        cast = self.transformer.get_cast_dtype()
        x = self.token_embedding(tokens).to(cast) + self.positional_embedding[:length].to(cast)
        mask = self.causal_mask[:length, :length].to(cast)
        for block in self.transformer.resblocks:
            x = x + block.ls_1(causal_attention(block, block.ln_1(x), mask))
            x = x + block.ls_2(block.mlp(block.ln_2(x)))
        return self.pool(x, tokens)

    def pool(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Last block's output x [B, T, D] -> embedding at each row's EOT (the max id of tokens
        [B, T]): final LayerNorm, projection, L2 normalisation; [B, E] float32."""
        x = self.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
        if isinstance(self.text_projection, nn.Linear):
            x = self.text_projection(x)
        elif self.text_projection is not None:
            x = x @ self.text_projection
        return F.normalize(x.float(), dim=-1)

    def example_inputs(self, batch: int = 2, length: int | None = None) -> tuple[torch.Tensor]:
        """Token ids [batch, length] with SOT, random words and EOT (the largest id) per row."""
        length = length or self.context_length
        vocab = int(self.token_embedding.num_embeddings)
        generator = torch.Generator().manual_seed(0)
        tokens = torch.zeros(batch, length, dtype=torch.long)
        for row in range(batch):
            end = 1 + int(torch.randint(0, length - 1, (1,), generator=generator))
            tokens[row, 0] = vocab - 2
            tokens[row, 1:end] = torch.randint(1, vocab - 2, (end - 1,), generator=generator)
            tokens[row, end] = vocab - 1
        return (tokens,)


def describe(tower: TextTower) -> dict[str, Any]:
    """Geometry of the text tower for the manifest."""
    return {
        "context_length": tower.context_length,
        "embed_dim": tower.embed_dim,
        "width": int(tower.positional_embedding.shape[1]),
        "layers": len(tower.transformer.resblocks),
        "vocab_size": int(tower.token_embedding.num_embeddings),
    }
