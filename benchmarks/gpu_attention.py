"""One layer's decode attention on a GPU: one query per row and head over a bf16 cache.

- `attention_rows`: SDPA under the static step's mask (the memory-efficient kernel, what the
  "torch" backend runs) against the Triton backend's `kernels.decode_attention` cut into 1 to 16
  shares, at a few batch sizes and context lengths: microseconds, the shares the settings give,
  and the largest gap between the two outputs.
- `attention_block_rows`: batch 1's `decode_attention` with each of ATTENTION_BLOCKS as the
  settings' `few_queries` (keys a loop turn, warps, programs per multiprocessor, which set the
  shares): microseconds and the largest gap from the base settings' output.

Each call is recorded 20 times in a CUDA graph and replayed (`common.graph_time`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from qwenvl.cache import KVCache
from qwenvl.config import LLMConfig
from qwenvl.decode import AttentionBlocks, KernelSettings, kernels
from qwenvl.model.llm import attention_kernels, visible_keys

from .common import graph_time, markdown_table

Timer = Callable[[Callable[[], object]], float]

ATTENTION_CASES = ((1, 320), (1, 2048), (8, 320), (32, 320))  # (batch, context)
ATTENTION_SPLITS = (1, 2, 4, 8, 16)
# (keys a turn, warps, programs per multiprocessor) for steps of few queries, around the defaults'
# few_queries (16, 2, 8); (64, 4, 2) is their many_queries. One warp sums without the
# shared-memory barriers of each turn, with more work a thread.
ATTENTION_BLOCKS = (
    (16, 2, 8), (16, 1, 8), (16, 4, 8), (32, 2, 8), (8, 2, 8), (16, 2, 4), (16, 2, 16), (16, 1, 16),
    (32, 1, 8), (32, 2, 16), (64, 4, 8), (64, 4, 2),
)  # fmt: skip


def filled_layer(
    llm: LLMConfig, batch: int, context: int, device: torch.device
) -> tuple[torch.Tensor, SimpleNamespace]:
    """A query [batch, heads, 1, d] and a step whose one-layer cache holds `context` random keys a
    row, each row's query at its last position."""
    cache = KVCache(dataclasses.replace(llm, num_hidden_layers=1), batch, context, torch.bfloat16, device)
    cache.keys[0].normal_()
    cache.values[0].normal_()
    query = torch.randn(
        batch, llm.num_attention_heads, 1, llm.kv_channels, device=device, dtype=torch.bfloat16
    )
    return query, SimpleNamespace(cache=cache, positions=torch.full((batch, 1), context - 1, device=device))


@torch.inference_mode()
def attention_rows(
    llm: LLMConfig, device: torch.device, settings: KernelSettings, timer: Timer = graph_time
) -> list[dict]:
    """SDPA against decode_attention's share counts, for each of ATTENTION_CASES."""
    rows = []
    for batch, context in ATTENTION_CASES:
        query, step = filled_layer(llm, batch, context, device)
        visible = visible_keys(step.positions, context, torch.bfloat16)
        keys, values = step.cache.view(0, context)

        def sdpa(query=query, keys=keys, values=values, visible=visible) -> torch.Tensor:
            return F.scaled_dot_product_attention(query, keys, values, attn_mask=visible)[:, :, 0]

        with attention_kernels():
            row = {"batch": batch, "context": context, "sdpa_us": timer(sdpa) * 1e6}
            expected = sdpa().float()
        queries = batch * llm.num_attention_heads
        row["default_splits"] = settings.attention_for(queries, kernels.multiprocessors(device))[1]
        for splits in ATTENTION_SPLITS:
            attend = functools.partial(kernels.decode_attention, query, step, 0, settings, splits)
            row[f"splits_{splits}_us"] = timer(attend) * 1e6
        flash = kernels.decode_attention(query, step, 0, settings).float()
        row["max_abs_gap"] = (flash - expected).abs().max().item()
        rows.append(row)
    return rows


@torch.inference_mode()
def attention_block_rows(
    llm: LLMConfig,
    device: torch.device,
    base: KernelSettings,
    timer: Timer = graph_time,
    context: int = 320,
    candidates: tuple[tuple[int, int, int], ...] = ATTENTION_BLOCKS,
) -> list[dict]:
    """Batch 1's decode attention over `context` keys under each candidate's `few_queries`."""
    query, step = filled_layer(llm, 1, context, device)
    expected = kernels.decode_attention(query, step, 0, base).float()
    rows = []
    for keys, warps, programs in candidates:
        blocks = AttentionBlocks(keys, warps, programs)
        settings = base.with_changes(few_queries=blocks)
        row = {"context": context, **dataclasses.asdict(blocks), "default": blocks == base.few_queries}
        row["splits"] = settings.attention_for(llm.num_attention_heads, kernels.multiprocessors(device))[1]
        try:
            row["us"] = timer(functools.partial(kernels.decode_attention, query, step, 0, settings)) * 1e6
            gap = kernels.decode_attention(query, step, 0, settings).float() - expected
            row["max_abs_gap"] = gap.abs().max().item()
        except Exception as error:  # blocks that do not compile here: keep the others
            row["error"] = repr(error)[:200]
        rows.append(row)
    return rows


def report_lines(results: dict) -> list[str]:
    lines = []
    attention = results.get("decode_attention", [])
    if attention and "error" in attention[0]:
        lines += [f"decode attention: {attention[0]['error'][:200]}", ""]
    elif attention:
        shares = [f"{n} shares" for n in ATTENTION_SPLITS]
        rows = [
            [r["batch"], r["context"], r["sdpa_us"], *(r[f"splits_{n}_us"] for n in ATTENTION_SPLITS)]
            + [r["default_splits"], r["max_abs_gap"]]
            for r in attention
        ]
        lines += [
            "one layer's decode attention (us): SDPA, and decode_attention in 1 to 16 shares",
            "",
            markdown_table(["batch", "context", "SDPA", *shares, "default shares", "largest gap"], rows),
            "",
        ]
    blocks = results.get("decode_attention_blocks", [])
    if blocks and "keys" not in blocks[0]:
        lines += [f"decode attention's blocks: {blocks[0].get('error', '')[:200]}", ""]
    elif blocks:
        rows = [
            [f"{r['keys']}{' *' if r['default'] else ''}", r["warps"], r["programs_per_multiprocessor"]]
            + [r["splits"], r.get("us", r.get("error")), r.get("max_abs_gap", "")]
            for r in blocks
        ]
        headers = ["keys a turn", "warps", "programs a multiprocessor", "shares", "us", "largest gap"]
        lines += [
            f"one layer's batch-1 decode attention over {blocks[0]['context']} keys (us), by its "
            "few_queries blocks (* the base settings')",
            "",
            markdown_table(headers, rows),
            "",
        ]
    return lines
