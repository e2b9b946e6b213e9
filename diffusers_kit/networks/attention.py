"""Attention blocks of the U-Net: self-attention over the pixels of a feature map, and the
spatial transformer of latent diffusion whose cross-attention lets a network attend to a context.

Multi-head attention (Vaswani et al. 2017, sec. 3.2): per head ``softmax(Q K^T / sqrt(d)) V``,
``d = channels / heads``, the heads concatenated. :func:`multi_head_attention` is the one
implementation; the blocks differ only in where ``Q``, ``K`` and ``V`` come from.

The spatial transformer (Rombach et al. 2022, sec. 3.3 and appendix): GroupNorm -> 1x1 conv ->
``depth`` transformer layers over the ``H W`` pixels as tokens, each

    x = x + SelfAttention(LayerNorm(x))
    x = x + CrossAttention(LayerNorm(x), context)    # Q = W_Q x, K = W_K tau(y), V = W_V tau(y)
    x = x + GEGLU feed-forward(LayerNorm(x))         # Shazeer 2020

-> 1x1 conv (zero-initialised, so a fresh block is the identity) -> + the block's input.
``tau(y)``, the context, is a ``(batch, tokens, context_dim)`` sequence from a conditioner
(:mod:`diffusers_kit.conditioners`).
"""

from __future__ import annotations

import torch
from torch import nn


def zero(module: nn.Module) -> nn.Module:
    """``module`` with every parameter set to zero (a residual branch that starts switched off)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def multi_head_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int
                         ) -> torch.Tensor:
    """``softmax(Q K^T / sqrt(d)) V`` per head: ``q`` is ``(B, N, C)``, ``k`` and ``v`` are
    ``(B, M, C)``; channel ``i d + j`` is dimension ``j`` of head ``i``. Returns ``(B, N, C)``."""
    b, n, c = q.shape
    m = k.shape[1]
    q = q.reshape(b, n, heads, c // heads).transpose(1, 2)
    k = k.reshape(b, m, heads, c // heads).transpose(1, 2)
    v = v.reshape(b, m, heads, c // heads).transpose(1, 2)
    out = nn.functional.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(b, n, c)


class SelfAttention(nn.Module):
    """Multi-head self-attention over the pixels of a feature map, with a residual connection
    (the DDPM U-Net's attention block, Ho et al. 2020): GroupNorm -> 1x1 conv to Q, K, V ->
    attention -> zero-initialised 1x1 conv -> + input."""

    def __init__(self, channels: int, heads: int, groups: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).flatten(2).transpose(1, 2).chunk(3, dim=-1)
        out = multi_head_attention(q, k, v, self.heads)
        return x + self.proj(out.transpose(1, 2).reshape(b, c, h, w))


class Attention(nn.Module):
    """Multi-head attention of a token sequence ``x`` (width ``dim``) to ``context`` (width
    ``context_dim``; ``x`` itself when None: self-attention). ``Q = W_Q x``, ``K = W_K c``,
    ``V = W_V c``, then an output projection."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None) -> None:
        super().__init__()
        self.heads = heads
        source = dim if context_dim is None else context_dim
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(source, dim, bias=False)
        self.to_v = nn.Linear(source, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        out = multi_head_attention(self.to_q(x), self.to_k(context), self.to_v(context),
                                   self.heads)
        return self.to_out(out)


class FeedForward(nn.Module):
    """GEGLU feed-forward (Shazeer 2020): ``W_2 (a * GELU(g))`` with ``[a, g] = W_1 x``, inner
    width ``mult * dim``."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, 2 * mult * dim)
        self.out = nn.Linear(mult * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return self.out(a * nn.functional.gelu(gate))


class TransformerLayer(nn.Module):
    """Pre-norm transformer layer: self-attention, cross-attention to the context, feed-forward,
    each a residual branch (the ``BasicTransformerBlock`` of Rombach et al. 2022)."""

    def __init__(self, dim: int, heads: int, context_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """A feature map attending to itself and to a context sequence (Rombach et al. 2022):
    GroupNorm -> 1x1 conv -> ``depth`` :class:`TransformerLayer` over the pixels -> zero 1x1 conv
    -> + input. ``forward(x, context)``: ``x`` is ``(B, C, H, W)``, ``context`` is
    ``(B, tokens, context_dim)``; a fresh block returns ``x`` exactly."""

    def __init__(self, channels: int, heads: int, context_dim: int, depth: int = 1,
                 groups: int = 8) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.layers = nn.ModuleList(TransformerLayer(channels, heads, context_dim)
                                    for _ in range(depth))
        self.proj_out = zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)
        context = context.to(tokens.dtype)
        for layer in self.layers:
            tokens = layer(tokens, context)
        return x + self.proj_out(tokens.transpose(1, 2).reshape(b, c, h, w))


__all__ = ["Attention", "FeedForward", "SelfAttention", "SpatialTransformer", "TransformerLayer",
           "multi_head_attention", "zero"]
