"""A decode step's small work in fewer GPU kernels (Triton), so batch-1 decoding nears the memory bound.

Batch-1 decoding reads every LLM weight once per token: 13.5 GB for Qwen-VL in bf16, in five
matrix-vector products per layer, 5.5 ms on an H100. Around them the eager layers launch some
twenty small kernels per layer (norms, rotary, cache writes, residual adds), a few microseconds
each even inside a CUDA graph: a graphed step took 7.9 ms (`benchmarks/gpu_profile.py`). Here two
kernels do that work for each half of a block, and the step takes 6.6 ms:

- `add_rms_norm`: the residual add and the RMSNorm after it (ln_1, ln_2, and ln_f at the end);
- `rotary_to_cache`: rotary on queries and keys, the log-n query scale, and the key and value
  writes into the cache.

They round where the eager layers round (fp32 inside, the model's dtype wherever eager code
stores a tensor), without fused multiply-adds; only the norm's sum may add up in another order.
`static_decode_step` uses them on CUDA when Triton is importable; everything else, the prefill
included, runs the eager layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .model.llm import attention_kernels

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the eager layers do all the work
    triton = None


def available(device: torch.device) -> bool:
    """Whether the kernels run by default on `device`: CUDA, with Triton installed.

    (Under TRITON_INTERPRET=1 they also run on CPU tensors when asked for: the tests do.)
    """
    return triton is not None and device.type == "cuda"


if triton is not None:

    @triton.jit
    def _add_rms_norm_kernel(
        x_ptr, delta_ptr, weight_ptr, residual_ptr, normed_ptr, width, eps, HAS_DELTA: tl.constexpr,
        BLOCK: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        inside = cols < width
        offsets = row * width + cols
        x = tl.load(x_ptr + offsets, mask=inside, other=0.0)
        if HAS_DELTA:
            delta = tl.load(delta_ptr + offsets, mask=inside, other=0.0)
            x = (x.to(tl.float32) + delta.to(tl.float32)).to(x_ptr.dtype.element_ty)
            tl.store(residual_ptr + offsets, x, mask=inside)
        xf = x.to(tl.float32)
        scale = tl.math.rsqrt(tl.sum(xf * xf, axis=0) / width + eps)
        normed = (xf * scale).to(x_ptr.dtype.element_ty)
        weight = tl.load(weight_ptr + cols, mask=inside, other=0.0)
        out = (normed.to(tl.float32) * weight.to(tl.float32)).to(normed_ptr.dtype.element_ty)
        tl.store(normed_ptr + offsets, out, mask=inside)

    @triton.jit
    def _rotary_to_cache_kernel(
        qkv_ptr, cos_ptr, sin_ptr, logn_ptr, position_ptr, query_ptr, keys_ptr, values_ptr,
        heads, head_dim, rot_dim,
        cache_row_stride, cache_head_stride, cache_position_stride,
        HAS_LOGN: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0)
        head = tl.program_id(1)
        channels = tl.arange(0, BLOCK)
        inside = channels < head_dim
        rotated = channels < rot_dim
        half = rot_dim // 2
        swapped = tl.where(channels < half, channels + half, channels - half)
        # qkv row: [3, heads, head_dim]
        q_base = qkv_ptr + row * 3 * heads * head_dim + head * head_dim
        k_base = q_base + heads * head_dim
        v_base = k_base + heads * head_dim
        cos = tl.load(cos_ptr + row * rot_dim + channels, mask=rotated, other=1.0)
        sin = tl.load(sin_ptr + row * rot_dim + channels, mask=rotated, other=0.0)

        q = tl.load(q_base + channels, mask=inside, other=0.0)
        q_swapped = tl.load(q_base + swapped, mask=rotated, other=0.0).to(tl.float32)
        q_turned = (q.to(tl.float32) * cos + q_swapped * sin).to(q.dtype)
        q = tl.where(rotated, q_turned, q)
        if HAS_LOGN:
            logn = tl.load(logn_ptr + row)
            q = (q.to(tl.float32) * logn.to(tl.float32)).to(logn.dtype)
        tl.store(query_ptr + (row * heads + head) * head_dim + channels, q, mask=inside)

        k = tl.load(k_base + channels, mask=inside, other=0.0)
        k_swapped = tl.load(k_base + swapped, mask=rotated, other=0.0).to(tl.float32)
        k = tl.where(rotated, (k.to(tl.float32) * cos + k_swapped * sin).to(k.dtype), k)
        v = tl.load(v_base + channels, mask=inside, other=0.0)
        position = tl.load(position_ptr + row)
        slot = row * cache_row_stride + head * cache_head_stride + position * cache_position_stride
        tl.store(keys_ptr + slot + channels, k, mask=inside)
        tl.store(values_ptr + slot + channels, v, mask=inside)


def _launch_options(block: int) -> dict:
    # no fused multiply-adds: eager kernels round each product and each sum
    return {"num_warps": 8 if block >= 2048 else 4, "enable_fp_fusion": False}


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, norm) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, norm(x + delta)) for rows [B, H] and an RMSNorm; with no delta, (x, norm(x))."""
    width = x.shape[-1]
    block = triton.next_power_of_2(width)
    residual = x if delta is None else torch.empty_like(x)
    normed = torch.empty_like(x)
    _add_rms_norm_kernel[(x.shape[0],)](
        x, x if delta is None else delta, norm.weight, residual, normed, width, norm.eps,
        HAS_DELTA=delta is not None, BLOCK=block, **_launch_options(block),
    )  # fmt: skip
    return residual, normed


def rotary_to_cache(qkv: torch.Tensor, step, layer: int, heads: int, head_dim: int) -> torch.Tensor:
    """Queries [B, heads, 1, d] of one decode token per row, its keys and values written into the cache.

    `qkv` [B, 3 * heads * d]: c_attn's output. The keys and values go to each row's position.
    """
    cache, rotary = step.cache, step.rotary
    batch = qkv.shape[0]
    query = torch.empty(batch, heads, 1, head_dim, dtype=qkv.dtype, device=qkv.device)
    keys, values = cache.keys[layer], cache.values[layer]  # [B, heads, capacity, d]
    block = triton.next_power_of_2(head_dim)
    _rotary_to_cache_kernel[(batch, heads)](
        qkv, rotary.cos, rotary.signed_sin, step.logn if step.logn is not None else qkv, step.positions,
        query, keys, values,
        heads, head_dim, rotary.cos.shape[-1],
        keys.stride(0), keys.stride(1), keys.stride(2),
        HAS_LOGN=step.logn is not None, BLOCK=block, **_launch_options(block),
    )  # fmt: skip
    return query


def run(transformer, embeds: torch.Tensor, step) -> torch.Tensor:
    """`transformer.run` for a static decode step (embeds [B, 1, H]) with the fused kernels.

    The same blocks: x + attn(ln_1(x)), then + mlp(ln_2(.)), then ln_f; each residual add is
    done by the norm that follows it.
    """
    cache = step.cache
    batch = embeds.shape[0]
    with attention_kernels():
        x, pending = embeds[:, 0].contiguous(), None  # pending: a branch's output, for the next norm to add
        for layer, block in enumerate(transformer.h):
            attn, mlp = block.attn, block.mlp
            x, normed = add_rms_norm(x, pending, block.ln_1)
            query = rotary_to_cache(attn.c_attn(normed), step, layer, attn.heads, attn.head_dim)
            keys, values = cache.view(layer, step.kv_length)
            out = F.scaled_dot_product_attention(query, keys, values, attn_mask=step.visible)
            x, normed = add_rms_norm(x, attn.c_proj(out.reshape(batch, -1)), block.ln_2)
            pending = mlp.c_proj(mlp.w1(normed) * F.silu(mlp.w2(normed)))
    _, normed = add_rms_norm(x, pending, transformer.ln_f)
    return normed[:, None]
