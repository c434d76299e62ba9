"""The Qwen LLM's pieces: RMSNorm, rotary with dynamic NTK and log-n scaling, attention, MLP (SPEC 5).

Module and parameter names are the checkpoint's (`transformer.h.{i}.attn.c_attn`, ...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..cache import KVCache
from ..config import LLMConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalized in fp32, as the original, then scaled in the model's dtype
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def ntk_alpha(length: int, cfg: LLMConfig) -> float:
    """Dynamic-NTK alpha of a prefill of `length` tokens: max(2^ceil(log2(L/seq_length)+1) - 1, 1)."""
    if not cfg.use_dynamic_ntk or length <= 0:
        return 1.0
    # python floats, as the original, so that ceil() sees exactly the same value at powers of two
    return float(max(2 ** math.ceil(math.log(length / cfg.seq_length, 2) + 1) - 1, 1))


def rotary_inv_freq(alphas: list[float], cfg: LLMConfig, device=None) -> torch.Tensor:
    """Per-row inverse frequencies [B, rotary_dim/2] for each row's NTK alpha.

    The same float ops as the original (python double base, fp32 power) so fp32 logits match to
    the last bits; computed once per prefill and kept in the cache for the decoding steps.
    """
    d = cfg.rotary_dim
    exponent = torch.arange(0, d, 2, device=device).float() / d
    rows = [1.0 / ((cfg.rotary_emb_base * a ** (d / (d - 2))) ** exponent) for a in alphas]
    return torch.stack(rows)


@dataclass
class Rotary:
    """cos/sin [B, L, rotary_dim] for the positions of one forward, shared by all layers (fp32)."""

    cos: torch.Tensor
    sin: torch.Tensor

    @classmethod
    def build(cls, positions: torch.Tensor, inv_freq: torch.Tensor) -> Rotary:
        freqs = positions.float()[:, :, None] * inv_freq[:, None, :]
        angles = torch.cat((freqs, freqs), dim=-1)
        return cls(angles.cos(), angles.sin())

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate x [B, L, heads, d] (rotate-half form) over its first rotary_dim channels."""
        rot_dim = self.cos.shape[-1]
        xf = x[..., :rot_dim].float()
        half = rot_dim // 2
        rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
        cos, sin = self.cos[:, :, None, :], self.sin[:, :, None, :]
        out = (xf * cos + rotated * sin).type_as(x)
        if rot_dim == x.shape[-1]:
            return out
        return torch.cat((out, x[..., rot_dim:]), dim=-1)


def logn_scale(positions: torch.Tensor, cfg: LLMConfig) -> torch.Tensor | None:
    """Per-position query scale log(p+1)/log(seq_length) past seq_length, else exactly 1.

    Always computed when enabled (no host sync to check whether any position needs it).
    """
    if not cfg.use_logn_attn:
        return None
    p1 = (positions + 1).double()
    scale = torch.where(p1 > cfg.seq_length, torch.log(p1) / math.log(cfg.seq_length), torch.ones_like(p1))
    return scale.float()


@dataclass
class Step:
    """What every layer of one forward shares: positions [B, L], rotary tables, log-n scale, the cache."""

    positions: torch.Tensor
    rotary: Rotary
    logn: torch.Tensor | None
    cache: KVCache | None
    # every row starts at position 0: plain causal attention over the new keys, no cache read
    fresh: bool
    # keys to attend over when reading the cache: up to the furthest row, or the whole capacity
    # (static shapes for CUDA graphs / compilation)
    kv_length: int = 0

    @classmethod
    def build(
        cls,
        cfg: LLMConfig,
        batch: int,
        length: int,
        cache: KVCache | None,
        lengths: list[int],
        device: torch.device | None = None,
    ) -> Step:
        if cache is None:
            positions = torch.arange(length, device=device)[None].expand(batch, length)
            inv_freq = rotary_inv_freq([ntk_alpha(n, cfg) for n in lengths], cfg, device)
            return cls(positions, Rotary.build(positions, inv_freq), logn_scale(positions, cfg), None, True)
        positions = cache.positions(length)
        fresh = not bool(cache.lengths.any())
        if fresh:  # a prefill: each row's alpha comes from its own prompt length, then stays
            alphas = [ntk_alpha(n, cfg) for n in lengths]
            cache.ntk_alpha = torch.tensor(alphas, device=positions.device)
            cache.inv_freq = rotary_inv_freq(alphas, cfg, positions.device)
        kv_length = 0 if fresh else int(positions.max()) + 1
        rotary = Rotary.build(positions, cache.inv_freq)
        return cls(positions, rotary, logn_scale(positions, cfg), cache, fresh, kv_length)

    @classmethod
    def static_decode(cls, cfg: LLMConfig, cache: KVCache) -> Step:
        """One token per row over the whole cache: the same shapes at every step, no host sync."""
        positions = cache.positions(1)
        rotary = Rotary.build(positions, cache.inv_freq)
        return cls(positions, rotary, logn_scale(positions, cfg), cache, False, cache.capacity)


class QWenAttention(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.num_attention_heads, cfg.kv_channels
        self.c_attn = nn.Linear(cfg.hidden_size, 3 * cfg.projection_size)
        self.c_proj = nn.Linear(cfg.projection_size, cfg.hidden_size, bias=not cfg.no_bias)

    def forward(self, x: torch.Tensor, step: Step, layer: int) -> torch.Tensor:
        batch, length, _ = x.shape
        q, k, v = self.c_attn(x).view(batch, length, 3, self.heads, self.head_dim).unbind(2)
        q, k = step.rotary.apply(q), step.rotary.apply(k)
        if step.logn is not None:
            q = q * step.logn[:, :, None, None].to(q.dtype)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, L, d]
        if step.cache is not None:
            step.cache.write(layer, step.positions, k, v)
        if step.fresh:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            keys, values = step.cache.view(layer, step.kv_length)
            # a key is visible to a query at or after its position: causal, and it hides the stale
            # entries past a shorter row's length, in one mask
            visible = (
                torch.arange(step.kv_length, device=x.device)[None, None, :] <= step.positions[:, :, None]
            )
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=visible[:, None])
        return self.c_proj(out.transpose(1, 2).reshape(batch, length, -1))


class QWenMLP(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.hidden_size, cfg.mlp_width, bias=not cfg.no_bias)
        self.w2 = nn.Linear(cfg.hidden_size, cfg.mlp_width, bias=not cfg.no_bias)
        self.c_proj = nn.Linear(cfg.mlp_width, cfg.hidden_size, bias=not cfg.no_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.w1(x) * F.silu(self.w2(x)))


class QWenBlock(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.ln_1 = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)
        self.attn = QWenAttention(cfg)
        self.ln_2 = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)
        self.mlp = QWenMLP(cfg)

    def forward(self, x: torch.Tensor, step: Step, layer: int) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), step, layer)
        return x + self.mlp(self.ln_2(x))
