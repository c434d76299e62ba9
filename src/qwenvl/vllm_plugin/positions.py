"""Qwen's dynamic NTK and log-n attention on vLLM's positions (SPEC 5).

The rotation of every token of a request uses the NTK alpha of the request's prompt length L,
from the prefill to the last decoding step. vLLM passes a model positions only, so each position
carries its request's alpha too: position p of a request whose alpha is the k-th (alpha =
2^(k+1) - 1) is sent as `k << ALPHA_SHIFT | p`. vLLM computes a request's prompt positions once
from the whole prompt (`request_positions`, the model's M-RoPE hook) and every later one as the
last plus one, so the high bits stay with the request through chunked prefill, decoding and
recomputation after preemption.

The rotary tables and the log-n scale are qwenvl's own (`qwenvl.model.llm`), computed the same way
per token, so each token's angles equal those of `model.chat` bit for bit.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import LLMConfig
from ..model.llm import Rotary, logn_scale, ntk_alpha, rotary_inv_freq

# vLLM adds a request's offset to int32 token counts, so a position with its alpha index stays
# below 2^31: 5 bits of alpha index (alphas up to 2^32 - 1) above 26 bits of position (67M tokens)
ALPHA_SHIFT = 26
POSITION_MASK = (1 << ALPHA_SHIFT) - 1
MAX_ALPHAS = 1 << (31 - ALPHA_SHIFT)


def alpha_index(alpha: float) -> int:
    """k of an NTK alpha 2^(k+1) - 1 (alpha 1 is k = 0)."""
    return round(math.log2(alpha + 1)) - 1


def alpha_count(llm: LLMConfig, max_len: int) -> int:
    """How many alphas prompts of up to `max_len` tokens use."""
    return alpha_index(ntk_alpha(max_len, llm)) + 1


def request_positions(llm: LLMConfig, prompt_len: int, rows: int) -> tuple[torch.Tensor, int]:
    """Positions [rows, prompt_len] of a prompt, carrying its alpha, and the offset that vLLM adds
    to the position of every token after it."""
    offset = alpha_index(ntk_alpha(prompt_len, llm)) << ALPHA_SHIFT
    positions = torch.arange(prompt_len, dtype=torch.int64) + offset
    return positions.expand(rows, prompt_len).clone(), offset


class QwenPositions(nn.Module):
    """Rotary tables and log-n scales of a batch of vLLM positions (alpha in the high bits)."""

    def __init__(self, llm: LLMConfig, max_len: int):
        super().__init__()
        self.llm = llm
        count = alpha_count(llm, max_len)
        if max_len > POSITION_MASK or count > MAX_ALPHAS:
            raise ValueError(
                f"a context of {max_len} tokens is too long for Qwen's positions in vLLM (at most "
                f"{POSITION_MASK} tokens and {MAX_ALPHAS} NTK alphas; seq_length is {llm.seq_length})"
            )
        alphas = [2.0 ** (k + 1) - 1 for k in range(count)]
        # one row of inverse frequencies per alpha, fp32, exactly as a qwenvl prefill makes them
        self.register_buffer("inv_freq", rotary_inv_freq(alphas, llm), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[Rotary, torch.Tensor | None]:
        """(Rotary with cos/sin [N, 1, rotary_dim], log-n scale [N, 1] or None) of positions [N]."""
        position = (positions & POSITION_MASK)[:, None]
        inv_freq = self.inv_freq[positions >> ALPHA_SHIFT]
        return Rotary.build(position, inv_freq), logn_scale(position, self.llm, dtype)
