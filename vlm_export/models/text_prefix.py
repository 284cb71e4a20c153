"""Prompts that share a token prefix, encoded with the prefix computed once (a key/value cache).

Under open_clip's causal mask, position t of a prompt sees positions <= t only, so the hidden
states of a prefix shared by many prompts (the template's "SOT a photo of a" before every class
name) are the same in each of them. ``SharedPrefixEncoder`` runs the prefixes once, keeps every
block's keys and values, and then runs only each prompt's own tokens (class name, the template's
tail, EOT) attending over its prefix's cached keys: the same arithmetic as the full prompt, about
half the tokens for CLIP's 80 ImageNet templates.

Prefixes of different lengths share one padded batch: a row's keys past its own prefix are
masked, and its own tokens take positions from its prefix's length on.
"""

from __future__ import annotations

import torch

from vlm_export.models.text_tower import TextTower, attend, split_heads

KeyValues = list[tuple[torch.Tensor, torch.Tensor]]


class SharedPrefixEncoder:
    """Embeddings of prompts given as (cached prefix, own tokens), exact under the causal mask."""

    def __init__(self, tower: TextTower) -> None:
        self.tower = tower
        self.blocks = list(tower.transformer.resblocks)
        self.cast = tower.transformer.get_cast_dtype()

    def _embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        tower = self.tower
        return tower.token_embedding(tokens).to(self.cast) + tower.positional_embedding[
            positions
        ].to(self.cast)

    def prefix_states(self, prefixes: torch.Tensor) -> KeyValues:
        """Every block's keys and values [G, H, P, d] of prefixes [G, P] (rows padded at end)."""
        length = prefixes.shape[1]
        x = self._embed(prefixes, torch.arange(length, device=prefixes.device))
        mask = self.tower.causal_mask[:length, :length].to(self.cast)
        states: KeyValues = []
        for block in self.blocks:
            q, k, v = split_heads(block, block.ln_1(x))
            states.append((k, v))
            x = x + block.ls_1(attend(block, q, k, v, mask))
            x = x + block.ls_2(block.mlp(block.ln_2(x)))
        return states

    def embed(
        self,
        own: torch.Tensor,
        group: torch.Tensor,
        prefix_lengths: torch.Tensor,
        states: KeyValues,
    ) -> torch.Tensor:
        """L2-normalised embeddings [B, E] of prompts = prefix of ``group`` + ``own`` tokens.

        ``own`` [B, S] int64: each row's tokens after its prefix, EOT included, zero-padded;
        ``group`` [B]: which prefix (row of ``states``) each row extends; ``prefix_lengths`` [G]
        the prefixes' true lengths (>= 1). ``states`` from ``prefix_states``.
        """
        batch, length = own.shape
        device = own.device
        start = prefix_lengths[group]  # [B]
        steps = torch.arange(length, device=device)
        context = self.tower.context_length
        positions = (start[:, None] + steps[None, :]).clamp(max=context - 1)  # pads past EOT
        x = self._embed(own, positions)
        padded = states[0][0].shape[2]
        blocked = torch.tensor(float("-inf"), dtype=self.cast, device=device)
        prefix_mask = torch.where(
            torch.arange(padded, device=device)[None, :] < start[:, None], 0.0, blocked
        ).to(self.cast)  # [B, P]
        own_mask = self.tower.causal_mask[:length, :length].to(self.cast)  # [S, S]
        mask = torch.cat(
            [prefix_mask[:, None, :].expand(batch, length, padded), own_mask.expand(batch, -1, -1)],
            dim=2,
        )[:, None]  # [B, 1, S, P + S]
        for block, (prefix_k, prefix_v) in zip(self.blocks, states, strict=True):
            q, k, v = split_heads(block, block.ln_1(x))
            keys = torch.cat([prefix_k[group], k], dim=2)
            values = torch.cat([prefix_v[group], v], dim=2)
            x = x + block.ls_1(attend(block, q, keys, values, mask))
            x = x + block.ls_2(block.mlp(block.ln_2(x)))
        return self.tower.pool(x, own)
