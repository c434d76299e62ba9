"""The resampler (`attn_pool`): 256 learned queries cross-attend to the ViT patches (SPEC 4, step 5)."""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn


def resize_positions(table: torch.Tensor, count: int) -> torch.Tensor:
    """A square grid of position embeddings [n, C] bicubically resized to `count` entries.

    Computed in fp32, as the original does, then returned in the table's dtype. The resize is
    linear in the table, so it runs as one product with `bicubic_weights`: CUDA's bicubic kernel
    loops over the 1664 channels in one thread per output cell, and its two calls (patches, then
    the resampler's keys) took 29 ms of a 38 ms image encoding on an H200; the products take
    microseconds.
    """
    src, dst = math.isqrt(table.shape[0]), math.isqrt(count)
    if src == dst:
        return table
    return (bicubic_weights(src, dst, table.device) @ table.float()).to(table.dtype)


@functools.lru_cache(maxsize=16)
def bicubic_weights(src: int, dst: int, device: torch.device) -> torch.Tensor:
    """[dst*dst, src*src] fp32: row i holds what each source cell adds to target cell i under
    F.interpolate(mode="bicubic", align_corners=False), read off by resizing one-hot grids."""
    # a plain tensor even when first asked for under inference_mode: training reuses it
    with torch.inference_mode(False), torch.no_grad():
        one_hot = torch.eye(src * src, dtype=torch.float64).reshape(src * src, 1, src, src)
        weights = F.interpolate(one_hot, size=(dst, dst), mode="bicubic", align_corners=False)
        return weights.reshape(src * src, dst * dst).t().float().to(device)


def sincos_positions(count: int, dim: int) -> torch.Tensor:
    """The fixed 2-D sine-cosine table [count, dim] the original resampler starts from.

    Half of the channels encode the grid row, half the column; each half is sin then cos of the
    position times 1/10000^(2i/half). Used only for fresh models: checkpoints carry their table.
    """
    grid = math.isqrt(count)
    half = dim // 2
    omega = 1.0 / 10000 ** (torch.arange(half // 2, dtype=torch.float64) / (half / 2))
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")

    def encode(position: torch.Tensor) -> torch.Tensor:
        angles = position.reshape(-1, 1).double() * omega
        return torch.cat((angles.sin(), angles.cos()), dim=1)

    return torch.cat((encode(cols), encode(rows)), dim=1).float()


def head_grid_positions(count: int, dim: int, heads: int) -> torch.Tensor:
    """A 2-D sine-cosine table [count, dim] in which every head's channels hold the row and the column.

    For fresh resamplers: with `sincos_positions` each attention head would see one coordinate
    only, so a query would pool a whole row or column. Frequencies 1/100^(i/f) suit a 16-cell grid.
    """
    grid = math.isqrt(count)
    per_head = dim // heads
    freqs = per_head // 4
    omega = 1.0 / 100 ** (torch.arange(freqs, dtype=torch.float64) / freqs)
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")

    def encode(position: torch.Tensor) -> torch.Tensor:
        angles = position.reshape(-1, 1).double() * omega
        return torch.cat((angles.sin(), angles.cos()), dim=1)

    head = torch.cat((encode(cols), encode(rows)), dim=1)  # [count, 4 * freqs]
    spare = torch.zeros(count, dim - heads * head.shape[1], dtype=head.dtype)  # when 4 does not divide
    return torch.cat([head] * heads + [spare], dim=1).float()


# fresh resamplers: how sharply a query prefers its own grid cell to its neighbours
QUERY_SHARPNESS = 3.0


class CrossAttention(nn.Module):
    """Multi-head attention with torch.nn.MultiheadAttention's parameter names ([Q;K;V] in_proj blocks)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim))
        self.out_proj = nn.Linear(dim, dim)

    def reset_parameters(self) -> None:
        # identity projections (queries scaled up): queries and keys both carry the 2-D position
        # table, so query i starts out reading grid cell i and passes it on unchanged (random
        # projections would make every query attend to the whole picture, and a fresh model would
        # see only its average colour)
        dim = self.in_proj_weight.shape[1]
        with torch.no_grad():
            self.in_proj_weight.copy_(torch.eye(dim).repeat(3, 1))
            self.in_proj_weight[:dim].mul_(QUERY_SHARPNESS)
            self.out_proj.weight.copy_(torch.eye(dim))
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q, k, v = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)
        batch, d = q.shape[0], q.shape[-1] // self.heads

        def split(x: torch.Tensor) -> torch.Tensor:  # [B, L, D] -> [B, heads, L, d]
            return x.view(batch, -1, self.heads, d).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(q), split(k), split(v))
        return self.out_proj(out.transpose(1, 2).reshape(batch, -1, self.heads * d))


class Resampler(nn.Module):
    def __init__(self, n_queries: int, dim: int, heads: int, kv_dim: int):
        super().__init__()
        self.query = nn.Parameter(torch.empty(n_queries, dim))
        # fixed 2-D sin-cos table in the original; loaded from the checkpoint, never recomputed
        self.pos_embed = nn.Parameter(torch.empty(n_queries, dim), requires_grad=False)
        self.kv_proj = nn.Linear(kv_dim, dim, bias=False) if kv_dim != dim else nn.Identity()
        self.attn = CrossAttention(dim, heads)
        self.ln_q = nn.LayerNorm(dim, eps=1e-6)
        self.ln_kv = nn.LayerNorm(dim, eps=1e-6)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.query, std=0.02)
        with torch.no_grad():
            self.pos_embed.copy_(head_grid_positions(*self.pos_embed.shape, self.attn.heads))
        # the learned queries start silent (their norm would drown the positions), then grow
        nn.init.zeros_(self.ln_q.weight)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """[B, patches, kv_dim] -> [B, n_queries, dim]."""
        kv = self.ln_kv(self.kv_proj(patches))
        q = self.ln_q(self.query) + self.pos_embed
        key_pos = resize_positions(self.pos_embed, patches.shape[1])
        return self.attn(q.expand(patches.shape[0], -1, -1), kv + key_pos, kv)
