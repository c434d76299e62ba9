"""A decode step's small work in fewer GPU kernels (Triton), so batch-1 decoding nears the memory bound.

Batch-1 decoding reads every LLM weight once per token: 14.2 GB for Qwen-VL in bf16, in five
matrix-vector products per layer, 5.5 ms on an H100. Around them the eager layers launch some
twenty small kernels per layer (norms, rotary, cache writes, residual adds), a few microseconds
each even inside a CUDA graph: a graphed step took 7.9 ms (`benchmarks/gpu_profile.py`), and
6.6 ms with the first two kernels below. The rest of that step's overhead was attention (0.6 ms:
SDPA runs one program per head, and reads the whole capacity under a mask) and the MLP's gate.

- `add_rms_norm`: the residual add and the RMSNorm after it (ln_1, ln_2, and ln_f at the end);
- `rotary_to_cache`: rotary on queries and keys, the log-n query scale, and the key and value
  writes into the cache;
- `decode_attention`: each query against the keys its row sees, cut into shares that run side
  by side and are combined after (flash decoding);
- `silu_gate`: w1(x) * silu(w2(x)), after one product for w1 and w2 together where
  `pack_gate_weights` laid them side by side (`gated`);
- `matvec`: a layer's product for one row (`MATVEC`), with c_attn's bias added in and, for the
  MLP's c_proj, the gate above computed as its input is read. Alone, cuBLAS read the layers'
  weights at 3.3-3.9 TB/s on an H200 whose copy bandwidth is 4.2, this kernel at 3.9-4.0 (the
  4096 x 4096 c_proj at 4.8: its 34 MB partly from the 60 MB L2 cache); in a whole step, where
  no weight stays in the cache, at 3.7, against cuBLAS's 3.5 (its split-K sums included).

On Hopper and later they launch early (`DEPENDENT_LAUNCH`): each starts while the one before it
ends, and waits for it before reading what it wrote. With them a graphed bf16 step of Qwen-VL
took 4.13 ms on an H200, 0.81 of the bound its copy bandwidth sets (benchmarks/results/gpu.md).

They round where the eager layers round (fp32 inside, the model's dtype wherever eager code
stores a tensor), without fused multiply-adds but in matvec's sums; the norm's sum and the
attention's sums may add up in another order. `static_decode_step` uses them on CUDA when
Triton is importable; everything else, the prefill included, runs the eager layers, except that
`decode_attention` serves the attention of every decode step on CUDA, eager or not
(`FLASH_DECODING`), and `matvec` every one-row product of the layers (`MATVEC`).
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the eager layers do all the work
    triton = None


def launching_on(device: torch.device):
    """A context that makes `device` CUDA's current device while a model on it runs: Triton launches
    its kernels on the current device, whatever device their tensors are on (a model loaded on
    cuda:1 while cuda:0 is current would hand them another GPU's memory)."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def available(device: torch.device) -> bool:
    """Whether the kernels run by default on `device`: CUDA, with Triton installed.

    (Under TRITON_INTERPRET=1 they also run on CPU tensors when asked for: the tests do.)
    """
    return triton is not None and device.type == "cuda"


if triton is not None:

    @triton.jit
    def _launched_early():
        # DEPENDENT_LAUNCH: the next kernel may launch now, and this one waits for the one before
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
        # row's sums depend on the blocks and warps alone (`matvec_config`), not on n, on where the
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


def _launch_options(block: int, device: torch.device) -> dict:
    # no fused multiply-adds: eager kernels round each product and each sum
    return {"num_warps": 8 if block >= 2048 else 4, "enable_fp_fusion": False, **_early(device)}


def _early(device: torch.device) -> dict:
    """DEPENDENT_LAUNCH's flags: the kernel's code (EARLY) and its launch's (launch_pdl)."""
    if dependent_launch(device):
        return {"EARLY": True, "launch_pdl": True}
    return {"EARLY": False}


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, norm) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, norm(x + delta)) for rows [B, H] and an RMSNorm; with no delta, (x, norm(x))."""
    width = x.shape[-1]
    block = triton.next_power_of_2(width)
    residual = x if delta is None else torch.empty_like(x)
    normed = torch.empty_like(x)
    _add_rms_norm_kernel[(x.shape[0],)](
        x, x if delta is None else delta, norm.weight, residual, normed, width, norm.eps,
        HAS_DELTA=delta is not None, BLOCK=block, **_launch_options(block, x.device),
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
        HAS_LOGN=step.logn is not None, BLOCK=block, **_launch_options(block, qkv.device),
    )  # fmt: skip
    return query


# Every one-query attention over the cache on CUDA runs `decode_attention`: the eager decode
# steps as well as the graphed ones, so that both round alike (its sums and those of SDPA's
# memory-efficient kernel differ in the last bits, enough to part greedy tokens of a random
# model). None: wherever the kernels run by default (`available`); False: SDPA everywhere
# (benchmarks.run --sdpa-decode, to compare the two); True: also under Triton's interpreter.
FLASH_DECODING: bool | None = None
# The decode attention of a step with fewer queries (rows x heads) than the device has
# multiprocessors, as at batch 1 to 4 of Qwen-VL on an H200: keys a program reads per loop turn,
# its warps (their sums' order: the same in every decode step of that many queries, eager or
# graphed), and programs per multiprocessor the shares aim for, enough to hide each one's memory
# latency. Chosen at batch 1 on an H200 (benchmarks/results/gpu.md): one layer's attention over
# 320 keys took 6.2 us in one warp against 7.4 under the settings below, and two warps took a
# graphed bf16 step 0.04 ms below one.
KEYS_PER_BLOCK = 16
ATTENTION_WARPS = 2
PROGRAMS_PER_MULTIPROCESSOR = 8
# ... and of a step with more queries (keys a turn, warps, programs per multiprocessor): under the
# settings above, batch 32 decoded 9% fewer tokens a second, and batch 64 13%
MANY_QUERIES_ATTENTION = (64, 4, 2)


def flash_decoding(device: torch.device) -> bool:
    """Whether one-query attention over the cache runs `decode_attention` on `device`."""
    if FLASH_DECODING is None:
        return available(device)
    return FLASH_DECODING and triton is not None


def attention_blocks(queries: int, device: torch.device) -> tuple[int, int, int]:
    """Keys a turn, warps, and shares of each row's keys of a decode attention of `queries`.

    Shares (flash decoding): one program per query (row, head) leaves most of an H100 idle at
    batch 1, 32 programs for 132 multiprocessors, each walking the whole context alone (the
    memory-efficient SDPA kernel took 19 us a layer, 0.6 ms of a 6.6 ms step). Shares fill the
    machine; a big batch needs none. None of the three depends on the rows' lengths or the
    cache's capacity: a CUDA graph's step keeps its shape, and a row's keys are read alike in a
    graphed step, an eager step over a cache of another capacity, and a batch of as many rows.
    """
    if queries >= multiprocessors(device):
        keys, warps, programs = MANY_QUERIES_ATTENTION
    else:
        keys, warps, programs = KEYS_PER_BLOCK, ATTENTION_WARPS, PROGRAMS_PER_MULTIPROCESSOR
    return keys, warps, max(1, -(-programs * multiprocessors(device) // queries))


@functools.cache
def multiprocessors(device: torch.device) -> int:
    """The device's multiprocessor count; asked once (every layer of every step needs it)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # Triton's interpreter (tests): a small GPU's worth


def decode_attention(query: torch.Tensor, step, layer: int, splits: int | None = None) -> torch.Tensor:
    """Attention [B, heads, d] of one query per row [B, heads, 1, d] over the keys its row sees.

    A row sees the cache's positions 0..its own (step.positions): what the decode steps' masks
    leave visible, read without the masked rest. `splits`: shares of each row's keys, computed
    apart and combined (default: `attention_blocks`); a share of none is a share too. The query,
    keys and values may be strided views whose vectors of d are contiguous.
    """
    batch, heads, _, head_dim = query.shape
    keys, values = step.cache.keys[layer], step.cache.values[layer]  # [B, heads, capacity, d]
    if any(t.stride(-1) != 1 for t in (query, keys, values)):
        raise ValueError("decode_attention needs the query, keys and values contiguous in their last dim")
    keys_per_block, warps, default_splits = attention_blocks(batch * heads, query.device)
    splits = default_splits if splits is None else splits
    out = torch.empty(batch, heads, head_dim, dtype=query.dtype, device=query.device)
    if splits > 1:
        part_acc = torch.empty(batch * heads * splits, head_dim, dtype=torch.float32, device=query.device)
        part_max = torch.empty(batch * heads * splits, dtype=torch.float32, device=query.device)
        part_sum = torch.empty_like(part_max)
    else:  # the one share writes the output itself
        part_acc = part_max = part_sum = out
    block = triton.next_power_of_2(head_dim)
    _attention_split_kernel[(batch, heads, splits)](
        query, keys, values, step.positions, out, part_acc, part_max, part_sum,
        heads, head_dim, head_dim**-0.5, query.stride(0), query.stride(1),
        keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2),
        SPLITS=splits, BLOCK_KEYS=keys_per_block, BLOCK=block,
        **{**_launch_options(block, query.device), "num_warps": warps},
    )  # fmt: skip
    if splits > 1:
        _attention_combine_kernel[(batch * heads,)](
            part_acc, part_max, part_sum, out, head_dim,
            SPLITS=splits, BLOCK_SPLITS=triton.next_power_of_2(splits), BLOCK=block,
            **_launch_options(block, query.device),
        )  # fmt: skip
    return out


def silu_gate(up: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
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
        up, gate, out, width, up.stride(0), gate.stride(0), BLOCK=block, **_launch_options(block, up.device)
    )
    return out


def pack_gate_weights(model) -> int:
    """Lays each MLP's w2 right after its w1 in memory, so that one product serves both (`gate_weights`).

    At batch 1 on an H100, cuBLAS read w1 and w2 (11008 x 4096 each) at 2.6 TB/s, where the
    lm_head's larger product reached 2.85 (benchmarks/results/gpu.md): the kernel it picked cuts
    11008 rows into 86 blocks of 128 for 132 multiprocessors. The parameters stay the same
    objects with the same values (only their storage moves), so optimizers and state dicts see
    no change, and it costs one layer's w1 and w2 of memory while it runs. Moving the model
    (.to) unpacks them, and the step goes back to two products. Returns how many MLPs are packed.
    """
    packed = 0
    for block in model.transformer.h:
        mlp = block.mlp
        if not _plain_gate(mlp):
            continue
        up, gate = mlp.w1.weight, mlp.w2.weight
        if not _side_by_side(up, gate):
            # the new storage is of the weights' kind, whatever mode the caller holds: ordinary
            # weights may train afterwards
            with torch.inference_mode(up.is_inference()), torch.no_grad():
                both = torch.cat([up, gate])
                up.data, gate.data = both[: len(up)], both[len(up) :]
        packed += 1
    return packed


def _plain_gate(mlp) -> bool:
    # adapters (peft wraps the Linear) and biases need the modules' own forward
    up, gate = mlp.w1, mlp.w2
    return type(up) is type(gate) is torch.nn.Linear and up.bias is None and gate.bias is None


def _side_by_side(up: torch.Tensor, gate: torch.Tensor) -> bool:
    return (
        up.is_contiguous()
        and gate.is_contiguous()
        and up.dtype == gate.dtype
        and up.shape[1:] == gate.shape[1:]
        and up.untyped_storage().data_ptr() == gate.untyped_storage().data_ptr()
        and gate.storage_offset() == up.storage_offset() + up.numel()
    )


def gate_weights(mlp) -> torch.Tensor | None:
    """w1 and w2 as one [2 * width, hidden] matrix (a view, for inference) when
    `pack_gate_weights` laid them side by side and they have stayed so; otherwise None."""
    if not _plain_gate(mlp):
        return None
    up, gate = mlp.w1.weight, mlp.w2.weight
    if not _side_by_side(up, gate):
        return None
    return up.detach().as_strided((up.shape[0] + gate.shape[0], up.shape[1]), up.stride())


def gated(mlp, x: torch.Tensor) -> torch.Tensor:
    """w1(x) * silu(w2(x)) for rows x [B, hidden]: one product for both when packed."""
    both = gate_weights(mlp)
    if both is None:
        return silu_gate(project(mlp.w1, x), project(mlp.w2, x))
    out = matvec(x.contiguous(), both) if _matvec_ready(mlp.w1, x) else F.linear(x, both)
    width = mlp.w1.out_features
    return silu_gate(out[:, :width], out[:, width:])


# The layers' products for one row through `matvec`, in every decode step alike (Step.project
# and QWenMLP route the eager layers' one-row products here too, so that eager and fused steps
# round alike: on an H200 the greedy tokens of a random real-sized model parted at the fourth
# when only the fused step used it). None wherever the kernels run by default (`available`);
# False: cuBLAS everywhere; True: also under Triton's interpreter.
MATVEC: bool | None = None


def matvec_config(k: int) -> dict:
    """The kernel's blocks for rows of k: a function of k alone, so that a row's product has the
    same bits in every matrix it is part of (w1 alone, or w1 and w2 packed) and in every run.

    4 rows of 1024 columns a turn, each tile of weights read a turn ahead (AHEAD), at both of
    Qwen-VL's widths: the quickest whole bf16 step on an H200 (benchmarks/results/gpu.md). The 16
    rows of 256 that Triton's autotuner picked for the 4096-wide products, timed alone, made a
    step 0.07 ms slower; AHEAD made one 0.07 ms quicker at 4096 and, with the kernels launched
    early, at 11008. How the kernel reads its tiles (AHEAD; num_stages, which its loop does not
    use) leaves the bits as they are: benchmarks/gpu_profile.py's matvec_sweep tries each way.
    """
    return {"BLOCK_N": 4, "BLOCK_K": 1024, "num_warps": 4, "num_stages": 3, "AHEAD": True}


def matvec_runs(device: torch.device) -> bool:
    """Whether `project` and `mlp_output` use the matvec kernel at batch 1 on `device`."""
    if MATVEC is None:
        return available(device)
    return MATVEC and triton is not None


# Programmatic dependent launch (CUDA capability 9.0 and later) for every kernel here: each waits
# for the one before it to finish before it reads anything, but `matvec`, which first reads a
# tile of weights (nothing in a decode step writes them). The small kernels let the next launch
# as they start, `matvec` once its loop is done. A kernel boundary then costs less than a launch
# and, before a product, a first read from memory: 128 products and about 190 other kernels a
# step. The bits stay the same. On an H200 a graphed bf16 step took 4.23 ms with it, 4.28 without
# (benchmarks/results/gpu.md); with `matvec` too letting the next launch from its start, 4.54
# against 4.35: the kernels launched ahead took the multiprocessors that the running one needed.
# Triton's interpreter cannot run it (benchmarks.run --no-dependent-launch: off).
DEPENDENT_LAUNCH = True


def dependent_launch(device: torch.device) -> bool:
    """Whether the kernels launch early (DEPENDENT_LAUNCH) on `device`: a Hopper or later GPU, and a
    Triton that has the instructions (3.4 and later)."""
    return (
        DEPENDENT_LAUNCH
        and available(device)
        and hasattr(tl.extra.cuda, "gdc_wait")
        and capability(device) >= (9, 0)
    )


@functools.cache
def capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def matvec(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, gate: torch.Tensor | None = None
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
    config = matvec_config(k)
    # fused multiply-adds named, not left to Triton's default (which its version 3.10 changes): the
    # same bits from one Triton to the next
    _matvec_kernel[(triton.cdiv(n, config["BLOCK_N"]),)](
        x, x if gate is None else gate, weight, weight if bias is None else bias, out, n, k,
        HAS_BIAS=bias is not None, GATED=gate is not None, enable_fp_fusion=True, **_early(x.device),
        **config,
    )  # fmt: skip
    return out


def _matvec_ready(linear, x: torch.Tensor) -> bool:
    # adapters (peft wraps the Linear) keep their own forward; batches go to cuBLAS's matrix kernels
    return (
        type(linear) is torch.nn.Linear
        and x.shape[0] == 1
        and linear.weight.is_contiguous()
        and linear.weight.numel() < 2**31
        and matvec_runs(x.device)
    )


def project(linear, x: torch.Tensor) -> torch.Tensor:
    """linear(x) for rows x [B, in]: one row through `matvec` where it runs, else the module."""
    if not _matvec_ready(linear, x):
        return linear(x)
    bias = None if linear.bias is None else linear.bias.detach()
    return matvec(x.contiguous(), linear.weight.detach(), bias)


def mlp_output(mlp, x: torch.Tensor) -> torch.Tensor:
    """c_proj(w1(x) * silu(w2(x))) for rows x [B, hidden]: at batch 1 with packed gate weights, two
    `matvec` calls, the second computing the gate as it reads its input; else `gated` and c_proj."""
    both = gate_weights(mlp)
    if both is None or not _matvec_ready(mlp.c_proj, x) or mlp.c_proj.bias is not None:
        return project(mlp.c_proj, gated(mlp, x))
    out = matvec(x.contiguous(), both)
    width = mlp.w1.out_features
    return matvec(out[:, :width], mlp.c_proj.weight.detach(), gate=out[:, width:])


def run(transformer, embeds: torch.Tensor, step) -> torch.Tensor:
    """`transformer.run` for a static decode step (embeds [B, 1, H]) with the fused kernels.

    The same blocks: x + attn(ln_1(x)), then + mlp(ln_2(.)), then ln_f; each residual add is
    done by the norm that follows it. Called inside model.llm.attention_kernels, as
    `transformer.run` holds it (static_decode_step does).
    """
    with launching_on(embeds.device):
        return _run_layers(transformer, embeds, step)


def _run_layers(transformer, embeds: torch.Tensor, step) -> torch.Tensor:
    batch = embeds.shape[0]
    x, pending = embeds[:, 0].contiguous(), None  # pending: a branch's output, for the next norm to add
    for layer, block in enumerate(transformer.h):
        attn, mlp = block.attn, block.mlp
        x, normed = add_rms_norm(x, pending, block.ln_1)
        query = rotary_to_cache(project(attn.c_attn, normed), step, layer, attn.heads, attn.head_dim)
        out = attn.attend_to_cache(query, step, layer)[:, :, 0]
        x, normed = add_rms_norm(x, project(attn.c_proj, out.reshape(batch, -1)), block.ln_2)
        pending = mlp_output(mlp, normed)
    _, normed = add_rms_norm(x, pending, transformer.ln_f)
    return normed[:, None]
