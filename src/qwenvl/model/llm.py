"""The Qwen LLM's pieces: RMSNorm, rotary with dynamic NTK and log-n scaling, attention, MLP (SPEC 5).

Module and parameter names are the checkpoint's (`transformer.h.{i}.attn.c_attn`, ...). The
layers are written in the operations of `ops.TorchOps`; the object passed in as `ops` does them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..cache import KVCache
from ..config import LLMConfig
from ..transfers import to_device
from .ops import TorchOps

# cuDNN's attention builds an execution plan for every new shape (tens of milliseconds, up to
# hundreds), and PyTorch keeps the plans per thread: every new prompt length, and every new
# serving thread, would pay for one before its first token (70 ms for a second turn that takes
# 20 without it on an H100). Flash and memory-efficient attention need no plan. (Inside a CUDA
# graph cuDNN's decode attention would be faster, 8 us per layer against 19 on an H200, but then
# the graph's attention would round differently from the eager path's.)
ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def attention_kernels():
    """The context every forward runs its attention in: SDPA without cuDNN's kernels."""
    return sdpa_kernel(ATTENTION_BACKENDS)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalized in fp32, as the original, then scaled in the model's dtype; F.rms_norm is one
        # fused kernel on a GPU where the spelled-out formula is five (decoding is kernel-bound)
        normalized = F.rms_norm(x.float(), self.weight.shape, eps=self.eps)
        return normalized.type_as(x) * self.weight


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
    """cos/sin [B, L, rotary_dim] for the positions of one forward, shared by all layers (fp32).

    `signed_sin` is the sine with its first half negated: rotate-half's cat(-x2, x1) * sin equals
    cat(x2, x1) * signed_sin exactly, one kernel fewer per layer.
    """

    cos: torch.Tensor
    signed_sin: torch.Tensor

    @classmethod
    def build(cls, positions: torch.Tensor, inv_freq: torch.Tensor) -> Rotary:
        freqs = positions.float()[:, :, None] * inv_freq[:, None, :]
        sin = freqs.sin()
        return cls(torch.cat((freqs, freqs), dim=-1).cos(), torch.cat((-sin, sin), dim=-1))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate x [B, L, ..., d] (rotate-half form) over its first rotary_dim channels.

        Any dims between L and d (heads; queries-or-keys and heads) share each position's angles,
        so queries and keys can turn in one pass: fewer kernels per layer, the same numbers.
        """
        rot_dim = self.cos.shape[-1]
        xf = x[..., :rot_dim].float()
        half = rot_dim // 2
        swapped = torch.cat((xf[..., half:], xf[..., :half]), dim=-1)
        shape = (*self.cos.shape[:2], *[1] * (x.dim() - 3), rot_dim)
        cos, sin = self.cos.view(shape), self.signed_sin.view(shape)
        out = (xf * cos + swapped * sin).type_as(x)
        if rot_dim == x.shape[-1]:
            return out
        return torch.cat((out, x[..., rot_dim:]), dim=-1)


def logn_scale(positions: torch.Tensor, cfg: LLMConfig, dtype: torch.dtype) -> torch.Tensor | None:
    """Per-position query scale log(p+1)/log(seq_length) past seq_length, else exactly 1.

    Always computed when enabled (no host sync to check whether any position needs it). In fp32,
    then in the queries' `dtype` as the original casts it: once here rather than in every layer.
    """
    if not cfg.use_logn_attn:
        return None
    p1 = (positions + 1).double()
    scale = torch.where(p1 > cfg.seq_length, torch.log(p1) / math.log(cfg.seq_length), torch.ones_like(p1))
    return scale.float().to(dtype)


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
    # when reading the cache, `visible_keys` of the positions: built once per forward, not per layer
    visible: torch.Tensor | None = None

    @classmethod
    def build(
        cls,
        cfg: LLMConfig,
        batch: int,
        length: int,
        cache: KVCache | None,
        lengths: list[int],
        device: torch.device | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Step:
        """`dtype`: the attention's (the hidden states'), for the log-n scale and the cache's mask."""
        if cache is None:
            positions = torch.arange(length, device=device)[None].expand(batch, length)
            inv_freq = rotary_inv_freq([ntk_alpha(n, cfg) for n in lengths], cfg, device)
            rotary = Rotary.build(positions, inv_freq)
            return cls(positions, rotary, logn_scale(positions, cfg, dtype), None, True)
        positions = cache.positions(length)
        held = cache.held  # known on the host: no wait for the device
        fresh = not any(held) if held is not None else not bool(cache.lengths.any())
        if fresh:  # a prefill: each row's alpha comes from its own prompt length, then stays
            alphas = [ntk_alpha(n, cfg) for n in lengths]
            cache.ntk_alpha = to_device(torch.tensor(alphas), positions.device)
            cache.inv_freq = rotary_inv_freq(alphas, cfg, positions.device)
            kv_length = 0
        else:
            kv_length = max(held) + length if held is not None else int(positions.max()) + 1
        rotary = Rotary.build(positions, cache.inv_freq)
        visible = None if fresh else visible_keys(positions, kv_length, dtype)
        return cls(positions, rotary, logn_scale(positions, cfg, dtype), cache, fresh, kv_length, visible)

    @classmethod
    def static_decode(cls, cfg: LLMConfig, cache: KVCache) -> Step:
        """One token per row over the whole cache: the same shapes at every step, no host sync."""
        positions = cache.positions(1)
        rotary = Rotary.build(positions, cache.inv_freq)
        dtype, capacity = cache.dtype, cache.capacity
        visible = visible_keys(positions, capacity, dtype)
        logn = logn_scale(positions, cfg, dtype)
        return cls(positions, rotary, logn, cache, False, capacity, visible)

    @property
    def device(self) -> torch.device:
        return self.positions.device

    def to(self, device: torch.device) -> Step:
        """The step's tables on `device`, for the blocks there of a model spread over devices (the
        cache is the same: each layer's keys are on their block's device already)."""

        def moved(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.to(device)

        rotary = Rotary(moved(self.rotary.cos), moved(self.rotary.signed_sin))
        return replace(
            self,
            positions=moved(self.positions),
            rotary=rotary,
            logn=moved(self.logn),
            visible=moved(self.visible),
        )


def visible_keys(positions: torch.Tensor, kv_length: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention mask [B, 1, L, kv_length]: 0 where a key is visible to a query, else -inf.

    A key is visible at or after its position: causal, and it hides the stale entries past a
    shorter row's length, in one mask. Built in the attention's dtype, as SDPA would turn a
    boolean mask into, so no layer converts it again; its rows start 16-element aligned, as the
    memory-efficient kernel needs (it would copy the mask in every layer otherwise).
    """
    keys = torch.arange(kv_length, device=positions.device)
    hidden = keys[None, None, :] > positions[:, :, None]
    aligned = -(-kv_length // 16) * 16
    mask = torch.zeros(*hidden.shape[:2], aligned, dtype=dtype, device=positions.device)[..., :kv_length]
    return mask.masked_fill_(hidden, float("-inf"))[:, None]


class QWenAttention(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.num_attention_heads, cfg.kv_channels
        self.c_attn = nn.Linear(cfg.hidden_size, 3 * cfg.projection_size)
        self.c_proj = nn.Linear(cfg.projection_size, cfg.hidden_size, bias=not cfg.no_bias)

    def forward(self, x: torch.Tensor, step: Step, layer: int, ops: TorchOps) -> torch.Tensor:
        qkv = ops.project(self.c_attn, x)
        query, key, value = ops.rotate_and_store(qkv, step, layer, self.heads, self.head_dim)
        return ops.project(self.c_proj, ops.attention(query, key, value, step, layer))


class QWenMLP(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.hidden_size, cfg.mlp_width, bias=not cfg.no_bias)
        self.w2 = nn.Linear(cfg.hidden_size, cfg.mlp_width, bias=not cfg.no_bias)
        self.c_proj = nn.Linear(cfg.mlp_width, cfg.hidden_size, bias=not cfg.no_bias)

    def forward(self, x: torch.Tensor, ops: TorchOps) -> torch.Tensor:
        return ops.mlp(self, x)


class QWenBlock(nn.Module):
    """x + attn(ln_1(x)), then + mlp(ln_2(.)). Each residual add is done by the norm after it: a
    block takes the previous block's MLP output (`pending`) and returns its own, for the next
    block's ln_1 (or the final ln_f) to add; the same sums, fewer kernels where a backend fuses
    an add with its norm."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.ln_1 = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)
        self.attn = QWenAttention(cfg)
        self.ln_2 = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)
        self.mlp = QWenMLP(cfg)

    def forward(
        self, x: torch.Tensor, pending: torch.Tensor | None, step: Step, layer: int, ops: TorchOps
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x, normed = ops.add_norm(x, pending, self.ln_1)
        x, normed = ops.add_norm(x, self.attn(normed, step, layer, ops), self.ln_2)
        return x, self.mlp(normed, ops)
