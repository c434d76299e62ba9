"""Decoding: the `Decoder` (a batch's KV cache, prefill and steps), its backends, sampling, and the
per-request `Sequence` that chooses tokens and stops.

See docs/architecture.md for how a chat turn flows through these.
"""

from .backends import BACKENDS, ops_for
from .decoder import Decoder
from .sampling import DECODE_MODES, PromptTooLongError, SamplingParams, choose_tokens
from .sequence import Choice, ChoiceError, Sequence, TokenLogprobs, choose_next
from .settings import AttentionBlocks, KernelSettings, MatvecBlocks

__all__ = [
    "BACKENDS",
    "DECODE_MODES",
    "AttentionBlocks",
    "Choice",
    "ChoiceError",
    "Decoder",
    "KernelSettings",
    "MatvecBlocks",
    "PromptTooLongError",
    "SamplingParams",
    "Sequence",
    "TokenLogprobs",
    "choose_next",
    "choose_tokens",
    "ops_for",
]
