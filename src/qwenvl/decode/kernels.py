"""The Triton kernels of a decode step's work, and their launchers (the Triton backend's tools).

Batch-1 decoding reads every LLM weight once per token: 14.2 GB for Qwen-VL in bf16, in five
matrix-vector products per layer, 5.5 ms on an H100. Around them the eager layers launch some
twenty small kernels per layer (norms, rotary, cache writes, residual adds), a few microseconds
each even inside a CUDA graph, and SDPA's attention runs one program per head over the whole
capacity. These do that work in fewer, better-shaped kernels:

- `add_rms_norm`: the residual add and the RMSNorm after it;
- `rotary_to_cache`: rotary on queries and keys, the log-n query scale, and the key and value
  writes into the cache;
- `decode_attention`: each query against the keys its row sees, cut into shares that run side
  by side and are combined after (flash decoding);
- `silu_gate`: w1(x) * silu(w2(x)) after one product for w1 and w2 together
  (`pack_gate_weights` lays them side by side);
- `matvec`: a layer's product for one row, with a bias added in or, for the MLP's c_proj, the
  gate computed as its input is read. In a whole step, where no weight stays in the cache, it
  read an H200's weights at 3.7 TB/s against cuBLAS's 3.5.

They round where the eager layers round (fp32 inside, the model's dtype wherever eager code
stores a tensor), without fused multiply-adds but in matvec's sums; the norm's sum and the
attention's sums may add up in another order. Each launcher takes the `KernelSettings` it runs
under. On CPU tensors they run under Triton's interpreter (TRITON_INTERPRET=1: the tests).
"""

from __future__ import annotations

import contextlib
import functools

import torch

from .settings import KernelSettings

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the eager layers do all the work
    triton = None


def available() -> bool:
    """Whether Triton is installed (the kernels need it)."""
    return triton is not None


def launching_on(device: torch.device):
    """A context that makes `device` CUDA's current device: Triton launches its kernels on the
    current device, whatever device their tensors are on (a model loaded on cuda:1 while cuda:0
    is current would hand them another GPU's memory)."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return torch.cuda.device(device)


if triton is not None:

    @triton.jit
    def _launched_early():
        # dependent launch: the next kernel may launch now, and this one waits for the one before
        # it to finish (and with it every kernel before) before it reads or writes anything
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()

    @triton.jit
    def _add_rms_norm_kernel(
        x_ptr, delta_ptr, weight_ptr, residual_ptr, normed_ptr, width, eps, HAS_DELTA: tl.constexpr,
        BLOCK: tl.constexpr, EARLY: tl.constexpr,
    ):  # fmt: skip
        if EARLY:
            _launched_early()
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
        HAS_LOGN: tl.constexpr, BLOCK: tl.constexpr, EARLY: tl.constexpr,
    ):  # fmt: skip
        if EARLY:
            _launched_early()
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

    @triton.jit
    def _attention_split_kernel(
        query_ptr, keys_ptr, values_ptr, position_ptr, out_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr,
        heads, head_dim, scale, query_row_stride, query_head_stride,
        key_row_stride, key_head_stride, key_position_stride,
        value_row_stride, value_head_stride, value_position_stride,
        SPLITS: tl.constexpr, BLOCK_KEYS: tl.constexpr, BLOCK: tl.constexpr, EARLY: tl.constexpr,
    ):  # fmt: skip
        # One query (row, head) against one of SPLITS equal shares of the keys it sees (0..its
        # position): the online softmax of flash attention over blocks of keys, without matrix units.
        if EARLY:
            _launched_early()
        row = tl.program_id(0)
        head = tl.program_id(1)
        split = tl.program_id(2)
        channels = tl.arange(0, BLOCK)
        inside = channels < head_dim
        visible = tl.load(position_ptr + row).to(tl.int32) + 1
        share = tl.cdiv(visible, SPLITS)
        start = split * share
        end = tl.minimum(start + share, visible)
        query_at = row * query_row_stride + head * query_head_stride
        q = tl.load(query_ptr + query_at + channels, mask=inside, other=0.0).to(tl.float32)
        out_at = (row * heads + head) * head_dim
        key_base = row * key_row_stride + head * key_head_stride
        value_base = row * value_row_stride + head * value_head_stride
        running_max = tl.full([1], float("-inf"), tl.float32)
        running_sum = tl.zeros([1], tl.float32)
        acc = tl.zeros([1, BLOCK], tl.float32)
        for first in range(start, end, BLOCK_KEYS):
            keys_at = first + tl.arange(0, BLOCK_KEYS)
            present = keys_at < end
            tile_mask = present[:, None] & inside[None, :]
            key_tile = key_base + keys_at[:, None] * key_position_stride + channels[None, :]
            k = tl.load(keys_ptr + key_tile, mask=tile_mask, other=0.0).to(tl.float32)
            # the values are read with the keys (not once the scores are known): one wait for memory a turn
            value_tile = value_base + keys_at[:, None] * value_position_stride + channels[None, :]
            v = tl.load(values_ptr + value_tile, mask=tile_mask, other=0.0)
            scores = tl.where(present, tl.sum(k * q[None, :], axis=1) * scale, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(scores, axis=0))
            decay = tl.exp(running_max - new_max)
            weights = tl.exp(scores - new_max)
            running_sum = running_sum * decay + tl.sum(weights, axis=0)
            # the weights meet the values in the values' dtype, as flash attention's kernels round them
            rounded = weights.to(v.dtype).to(tl.float32)
            acc = acc * decay[:, None] + tl.sum(rounded[:, None] * v.to(tl.float32), axis=0)[None, :]
            running_max = new_max
        if SPLITS == 1:
            out = (acc / running_sum[:, None]).to(out_ptr.dtype.element_ty)
            tl.store(out_ptr + out_at + channels[None, :], out, mask=inside[None, :])
        else:
            part = (row * heads + head) * SPLITS + split
            tl.store(part_acc_ptr + part * head_dim + channels[None, :], acc, mask=inside[None, :])
            tl.store(part_max_ptr + part + tl.arange(0, 1), running_max)
            tl.store(part_sum_ptr + part + tl.arange(0, 1), running_sum)

    @triton.jit
    def _attention_combine_kernel(
        part_acc_ptr, part_max_ptr, part_sum_ptr, out_ptr, head_dim,
        SPLITS: tl.constexpr, BLOCK_SPLITS: tl.constexpr, BLOCK: tl.constexpr, EARLY: tl.constexpr,
    ):  # fmt: skip
        if EARLY:
            _launched_early()
        query = tl.program_id(0)  # row * heads + head
        splits = tl.arange(0, BLOCK_SPLITS)
        used = splits < SPLITS
        channels = tl.arange(0, BLOCK)
        inside = channels < head_dim
        parts = query * SPLITS + splits
        maxima = tl.load(part_max_ptr + parts, mask=used, other=float("-inf"))
        sums = tl.load(part_sum_ptr + parts, mask=used, other=0.0)
        tile = parts[:, None] * head_dim + channels[None, :]
        acc = tl.load(part_acc_ptr + tile, mask=used[:, None] & inside[None, :], other=0.0)
        top = tl.max(maxima, axis=0)
        # an empty share (fewer keys than shares) has max -inf and weighs exp(-inf) = 0
        share_weights = tl.exp(maxima - top)
        total = tl.sum(share_weights * sums, axis=0)
        out = tl.sum(share_weights[:, None] * acc, axis=0) / total
        tl.store(out_ptr + query * head_dim + channels, out.to(out_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _silu_gate_kernel(
        up_ptr, gate_ptr, out_ptr, width, up_row_stride, gate_row_stride,
        BLOCK: tl.constexpr, EARLY: tl.constexpr,
    ):  # fmt: skip
        if EARLY:
            _launched_early()
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = cols < width
        up = tl.load(up_ptr + row * up_row_stride + cols, mask=inside, other=0.0)
        gate = tl.load(gate_ptr + row * gate_row_stride + cols, mask=inside, other=0.0).to(tl.float32)
        # eager rounds silu's result to the model's dtype before the product
        silu = (gate / (1.0 + tl.exp(-gate))).to(up.dtype)
        product = (up.to(tl.float32) * silu.to(tl.float32)).to(up.dtype)
        tl.store(out_ptr + row * width + cols, product, mask=inside)

    @triton.jit
    def _weight_tile(weight_ptr, rows, row_in, at, k):
        # weights [rows, columns at]; nothing (zeros) past the matrix's edges
        return tl.load(
            weight_ptr + rows[:, None] * k + at[None, :], mask=row_in[:, None] & (at < k)[None, :], other=0.0
        )

    @triton.jit
    def _matvec_input(x_ptr, gate_ptr, at, inside, GATED: tl.constexpr):
        # x at the offsets `at`; GATED: x * silu(gate), rounded as _silu_gate_kernel does
        x = tl.load(x_ptr + at, mask=inside, other=0.0)
        if GATED:
            gate = tl.load(gate_ptr + at, mask=inside, other=0.0).to(tl.float32)
            silu = (gate / (1.0 + tl.exp(-gate))).to(x.dtype)
            x = (x.to(tl.float32) * silu.to(tl.float32)).to(x.dtype)
        return x

    @triton.jit
    def _matvec_kernel(
        x_ptr, gate_ptr, weight_ptr, bias_ptr, out_ptr, n, k,
        HAS_BIAS: tl.constexpr, GATED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        AHEAD: tl.constexpr, EARLY: tl.constexpr,
    ):  # fmt: skip
        # BLOCK_N output rows per program, each a dot product of a weight row with x (of k). Each
        # row's sums depend on the blocks and warps alone (`MatvecBlocks`), not on n, on where the
        # row is, or on how the tiles are read (AHEAD: the next tile of weights is read before this
        # one is summed, two in flight).
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_in = rows < n
        cols = tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        if AHEAD:
            ahead = _weight_tile(weight_ptr, rows, row_in, cols, k)
        for first in range(0, k, BLOCK_K):
            at = first + cols
            col_in = at < k
            if AHEAD:
                w = ahead
                ahead = _weight_tile(weight_ptr, rows, row_in, at + BLOCK_K, k)
            else:  # written out: through _weight_tile this loop took 79 registers, not 72 (6 programs
                # per multiprocessor, not 7)
                tile = rows[:, None] * k + at[None, :]
                w = tl.load(weight_ptr + tile, mask=row_in[:, None] & col_in[None, :], other=0.0)
            if EARLY:
                if first == 0:  # its first weights read, it waits for the kernel before to finish
                    tl.extra.cuda.gdc_wait()
            x = _matvec_input(x_ptr, gate_ptr, at, col_in, GATED).to(tl.float32)[None, :]
            acc += w.to(tl.float32) * x
        if EARLY:  # the next kernel launches for this one's tail (from its start, steps ran slower)
            tl.extra.cuda.gdc_launch_dependents()
        out = tl.sum(acc, axis=1)
        if HAS_BIAS:
            out += tl.load(bias_ptr + rows, mask=row_in, other=0.0).to(tl.float32)
        tl.store(out_ptr + rows, out.to(out_ptr.dtype.element_ty), mask=row_in)


def _launch_options(block: int, device: torch.device, settings: KernelSettings) -> dict:
    # no fused multiply-adds: eager kernels round each product and each sum
    return {"num_warps": 8 if block >= 2048 else 4, "enable_fp_fusion": False, **_early(device, settings)}


def _early(device: torch.device, settings: KernelSettings) -> dict:
    """The dependent-launch flags: the kernel's code (EARLY) and its launch's (launch_pdl)."""
    if launches_early(device, settings):
        return {"EARLY": True, "launch_pdl": True}
    return {"EARLY": False}


def launches_early(device: torch.device, settings: KernelSettings) -> bool:
    """Whether the kernels launch early on `device`: asked for, a Hopper or later GPU, and a Triton
    that has the instructions (3.4 and later). Triton's interpreter cannot run them.

    Each kernel then waits for the one before it to finish before it reads anything, but
    `matvec`, which first reads a tile of weights (nothing in a decode step writes them); the
    small kernels let the next launch as they start, `matvec` once its loop is done. On an H200 a
    graphed bf16 step took 4.23 ms with it, 4.28 without (benchmarks/results/gpu.md).
    """
    return (
        settings.dependent_launch
        and device.type == "cuda"
        and triton is not None
        and hasattr(tl.extra.cuda, "gdc_wait")
        and capability(device) >= (9, 0)
    )


@functools.cache
def capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


@functools.cache
def multiprocessors(device: torch.device) -> int:
    """The device's multiprocessor count; asked once (every layer of every step needs it)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # Triton's interpreter (tests): a small GPU's worth


def add_rms_norm(
    x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float, settings: KernelSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, rms_norm(x + delta) * weight) for rows [B, H]; with no delta, (x, its norm)."""
    width = x.shape[-1]
    block = triton.next_power_of_2(width)
    residual = x if delta is None else torch.empty_like(x)
    normed = torch.empty_like(x)
    _add_rms_norm_kernel[(x.shape[0],)](
        x, x if delta is None else delta, weight, residual, normed, width, eps,
        HAS_DELTA=delta is not None, BLOCK=block, **_launch_options(block, x.device, settings),
    )  # fmt: skip
    return residual, normed


def rotary_to_cache(
    qkv: torch.Tensor, step, layer: int, heads: int, head_dim: int, settings: KernelSettings
) -> torch.Tensor:
    """Queries [B, heads, 1, d] of one decode token per row; its keys and values are written into
    the cache at each row's position. `qkv` [B, 3 * heads * d]: c_attn's output."""
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
        HAS_LOGN=step.logn is not None, BLOCK=block, **_launch_options(block, qkv.device, settings),
    )  # fmt: skip
    return query


def decode_attention(
    query: torch.Tensor, step, layer: int, settings: KernelSettings, splits: int | None = None
) -> torch.Tensor:
    """Attention [B, heads, d] of one query per row [B, heads, 1, d] over the keys its row sees.

    A row sees the cache's positions 0..its own (step.positions): what the decode steps' masks
    leave visible, read without the masked rest. `splits`: shares of each row's keys, computed
    apart and combined (default: `KernelSettings.attention_for`); a share of none is a share too.
    The query, keys and values may be strided views whose vectors of d are contiguous.
    """
    batch, heads, _, head_dim = query.shape
    keys, values = step.cache.keys[layer], step.cache.values[layer]  # [B, heads, capacity, d]
    if any(t.stride(-1) != 1 for t in (query, keys, values)):
        raise ValueError("decode_attention needs the query, keys and values contiguous in their last dim")
    blocks, default_splits = settings.attention_for(batch * heads, multiprocessors(query.device))
    splits = default_splits if splits is None else splits
    out = torch.empty(batch, heads, head_dim, dtype=query.dtype, device=query.device)
    if splits > 1:
        part_acc = torch.empty(batch * heads * splits, head_dim, dtype=torch.float32, device=query.device)
        part_max = torch.empty(batch * heads * splits, dtype=torch.float32, device=query.device)
        part_sum = torch.empty_like(part_max)
    else:  # the one share writes the output itself
        part_acc = part_max = part_sum = out
    block = triton.next_power_of_2(head_dim)
    options = _launch_options(block, query.device, settings)
    _attention_split_kernel[(batch, heads, splits)](
        query, keys, values, step.positions, out, part_acc, part_max, part_sum,
        heads, head_dim, head_dim**-0.5, query.stride(0), query.stride(1),
        keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2),
        SPLITS=splits, BLOCK_KEYS=blocks.keys, BLOCK=block, **{**options, "num_warps": blocks.warps},
    )  # fmt: skip
    if splits > 1:
        _attention_combine_kernel[(batch * heads,)](
            part_acc, part_max, part_sum, out, head_dim,
            SPLITS=splits, BLOCK_SPLITS=triton.next_power_of_2(splits), BLOCK=block, **options,
        )  # fmt: skip
    return out


def silu_gate(up: torch.Tensor, gate: torch.Tensor, settings: KernelSettings) -> torch.Tensor:
    """up * silu(gate) in one kernel (the MLP's w1(x) * silu(w2(x))), for rows [B, width].

    The rows may be strided (the two halves of one product's output), each row contiguous.
    """
    if up.shape != gate.shape or up.dim() != 2 or up.stride(-1) != 1 or gate.stride(-1) != 1:
        raise ValueError(f"silu_gate needs two [rows, width] tensors with contiguous rows, got "
                         f"{tuple(up.shape)} and {tuple(gate.shape)}")  # fmt: skip
    rows, width = up.shape
    out = torch.empty(rows, width, dtype=up.dtype, device=up.device)
    block = 1024
    _silu_gate_kernel[(rows, triton.cdiv(width, block))](
        up, gate, out, width, up.stride(0), gate.stride(0), BLOCK=block,
        **_launch_options(block, up.device, settings),
    )  # fmt: skip
    return out


def matvec(
    x: torch.Tensor,
    weight: torch.Tensor,
    settings: KernelSettings,
    bias: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """x @ weight.T (+ bias) for one row x [1, k] and a contiguous weight [n, k]: [1, n].

    `gate` [1, k]: the product takes x * silu(gate) instead (the MLP's gated input). x and gate
    may be views (the halves of one product's output) whose k values are contiguous.
    """
    n, k = weight.shape
    if x.shape != (1, k) or x.stride(-1) != 1 or not weight.is_contiguous() or n * k >= 2**31:
        raise ValueError(f"matvec needs one contiguous row of {k} and a contiguous weight below 2^31 "
                         f"values, got {tuple(x.shape)} and {tuple(weight.shape)}")  # fmt: skip
    if gate is not None and (gate.shape != x.shape or gate.stride(-1) != 1):
        raise ValueError(f"matvec's gate must be shaped as x {tuple(x.shape)}, got {tuple(gate.shape)}")
    out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    blocks = settings.matvec_for(k).launch()
    # fused multiply-adds named, not left to Triton's default (which its version 3.10 changes): the
    # same bits from one Triton to the next
    _matvec_kernel[(triton.cdiv(n, blocks["BLOCK_N"]),)](
        x, x if gate is None else gate, weight, weight if bias is None else bias, out, n, k,
        HAS_BIAS=bias is not None, GATED=gate is not None, enable_fp_fusion=True,
        **_early(x.device, settings), **blocks,
    )  # fmt: skip
    return out
