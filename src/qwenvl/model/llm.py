"""The Qwen LLM's pieces: RMSNorm, rotary with dynamic NTK and log-n scaling, attention, MLP (SPEC 5).

Module and parameter names are the checkpoint's (`transformer.h.{i}.attn.c_attn`, ...).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .. import fused_decode
from ..cache import KVCache
from ..config import LLMConfig
from ..transfers import to_device

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
    # faster products for some Linear modules, without gradients (on CPU: cpu_weights)
    products: Mapping[nn.Module, Callable[[torch.Tensor], torch.Tensor]] | None = None

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
        fresh = cache.empty or not bool(cache.lengths.any())
        if fresh:  # a prefill: each row's alpha comes from its own prompt length, then stays
            alphas = [ntk_alpha(n, cfg) for n in lengths]
            cache.ntk_alpha = to_device(torch.tensor(alphas), positions.device)
            cache.inv_freq = rotary_inv_freq(alphas, cfg, positions.device)
        kv_length = 0 if fresh else int(positions.max()) + 1
        rotary = Rotary.build(positions, cache.inv_freq)
        visible = None if fresh else visible_keys(positions, kv_length, dtype)
        return cls(positions, rotary, logn_scale(positions, cfg, dtype), cache, fresh, kv_length, visible)

    @classmethod
    def static_decode(cls, cfg: LLMConfig, cache: KVCache, products: Mapping | None = None) -> Step:
        """One token per row over the whole cache: the same shapes at every step, no host sync."""
        positions = cache.positions(1)
        rotary = Rotary.build(positions, cache.inv_freq)
        dtype, capacity = cache.keys.dtype, cache.capacity
        visible = visible_keys(positions, capacity, dtype)
        logn = logn_scale(positions, cfg, dtype)
        return cls(positions, rotary, logn, cache, False, capacity, visible, products)

    def project(self, linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """linear(x), through the step's own product for it when it has one (CPU layouts), or for
        one row on CUDA through fused_decode.matvec; with gradients, always the module."""
        product = self.products.get(linear) if self.products and not torch.is_grad_enabled() else None
        if product is not None:
            return product(x)
        if one_row_on_matvec(x):
            return fused_decode.project(linear, x.reshape(1, -1)).view(*x.shape[:-1], -1)
        return linear(x)


def one_row_on_matvec(x: torch.Tensor) -> bool:
    """Whether a layer's products of x [B, L, in], one row, go through fused_decode.matvec: on
    CUDA, without gradients, outside torch.compile (see fused_decode.MATVEC). The LM head's
    [B, hidden] stays with cuBLAS, whose kernel reads its 1.2 GB at 4.2-4.4 TB/s on an H200."""
    return (
        x.dim() == 3
        and x.shape[0] * x.shape[1] == 1
        and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and fused_decode.matvec_runs(x.device)
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

    def forward(self, x: torch.Tensor, step: Step, layer: int) -> torch.Tensor:
        batch, length, _ = x.shape
        qkv = step.project(self.c_attn, x).view(batch, length, 3, self.heads, self.head_dim)
        q, k = step.rotary.apply(qkv[:, :, :2]).unbind(2)
        v = qkv[:, :, 2]
        if step.logn is not None:
            q = q * step.logn[:, :, None, None]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, L, d]
        if step.cache is not None:
            step.cache.write(layer, step.positions, k, v)
        if step.fresh:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = self.attend_to_cache(q, step, layer)
        return step.project(self.c_proj, out.transpose(1, 2).reshape(batch, length, -1))

    @staticmethod
    def attend_to_cache(query: torch.Tensor, step: Step, layer: int) -> torch.Tensor:
        """Queries [B, heads, L, d] against the keys of the cache each row sees, [B, heads, L, d].

        One query per row on CUDA: flash decoding (fused_decode.decode_attention), in every decode
        step alike; otherwise SDPA under the step's mask. A step torch.compile traces keeps SDPA:
        inductor rounds its own way anyway, and the kernel is untried inside a compiled graph.
        """
        one_query = query.shape[2] == 1
        if one_query and fused_decode.flash_decoding(query.device) and not torch.compiler.is_compiling():
            return fused_decode.decode_attention(query, step, layer)[:, :, None]
        keys, values = step.cache.view(layer, step.kv_length)
        if one_query and query.device.type == "cpu" and query.dtype in (torch.bfloat16, torch.float16):
            return one_query_attention(query, keys, values, step.visible)
        return F.scaled_dot_product_attention(query, keys, values, attn_mask=step.visible)


def one_query_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor):
    """SDPA for one query per row in bf16 or fp16 on CPU, spelled out: two matrix products in the
    inputs' dtype around an fp32 softmax.

    SDPA's CPU kernel takes longer there (one layer of a mid-size decode step, 16 heads of 64: in
    bf16 334 us instead of 117 over 365 keys, 2.0 ms instead of 0.28 over 2048; in fp16 609
    instead of 389 over 365), while in fp32 it is the fast one. Every one-query step uses this,
    eager or static, so both round alike.
    """
    scores = (query @ keys.transpose(-1, -2)).float() * query.shape[-1] ** -0.5 + mask.float()
    return scores.softmax(dim=-1).to(values.dtype) @ values


class QWenMLP(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.hidden_size, cfg.mlp_width, bias=not cfg.no_bias)
        self.w2 = nn.Linear(cfg.hidden_size, cfg.mlp_width, bias=not cfg.no_bias)
        self.c_proj = nn.Linear(cfg.mlp_width, cfg.hidden_size, bias=not cfg.no_bias)

    def forward(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        if one_row_on_matvec(x):  # what the fused decode step does, bit for bit
            return fused_decode.mlp_output(self, x.reshape(1, -1)).view(x.shape)
        gated = step.project(self.w1, x) * F.silu(step.project(self.w2, x))
        return step.project(self.c_proj, gated)


class QWenBlock(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.ln_1 = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)
        self.attn = QWenAttention(cfg)
        self.ln_2 = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)
        self.mlp = QWenMLP(cfg)

    def forward(self, x: torch.Tensor, step: Step, layer: int) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), step, layer)
        return x + self.mlp(self.ln_2(x), step)
