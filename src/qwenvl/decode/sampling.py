"""Sampling parameters and the choice of a next token from logits: greedy, temperature, top-k, top-p,
repetition penalty. Pure functions of tensors; `sequence.py` applies them to requests.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from .stop_strings import StopStrings

# "plain": the cache read up to its longest row (the length comes from the host); "static": the
# same step with static shapes and no host sync; "compile" and "cuda_graph" run that step
# compiled or replayed; "auto": CUDA graphs on a GPU, static steps elsewhere (decoder.py)
DECODE_MODES = ("auto", "plain", "static", "compile", "cuda_graph")


class PromptTooLongError(ValueError):
    """A prompt that does not fit the model's context window."""


# Below this temperature sampling is greedy decoding (vLLM's rule too): dividing fp32 logits by a
# smaller one overflows to inf, and the softmax of inf is NaN.
GREEDY_BELOW_TEMPERATURE = 1e-5


def refuse_unknown(names: Collection[str], known: Collection[str], kind: str) -> None:
    """ValueError naming each of `names` (none: nothing to refuse), with the known spelling it may mean."""
    if not names:
        return
    described = []
    for name in sorted(names):
        close = difflib.get_close_matches(name, list(known), n=1)
        described.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    plural = "s" if len(described) > 1 else ""
    raise ValueError(f"unknown {kind}{plural}: " + ", ".join(described))


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 512
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop_words_ids: tuple[tuple[int, ...], ...] = ()
    eos_token_id: int | tuple[int, ...] | None = None  # one id or several end the sequence
    # no end (end-of-text, stop word or string) before this many tokens, as in vLLM's min_tokens
    min_new_tokens: int = 0
    stop_strings: StopStrings | None = None  # text that ends the sequence once generated
    seed: int | None = None
    # report each chosen token's log-probability and this many of the most likely ids'
    # (`sequence.TokenLogprobs`); None: none, and no row pays for them
    logprobs: int | None = None
    # one of DECODE_MODES; "auto": CUDA graphs on a GPU, static steps on CPU
    decode_mode: str = "auto"

    @classmethod
    def from_config(
        cls, generation_config: Any = None, *, tokenizer: Any = None, **overrides: Any
    ) -> SamplingParams:
        """Values from a transformers GenerationConfig (or anything with those attributes), then
        overrides (None: not given). ValueError for a name that is no field (with the spelling
        it may mean) and for values no sequence can be decoded with. Stop strings given as text
        need the `tokenizer` (transformers asks generate() for it too)."""
        names = {f.name for f in fields(cls)}
        refuse_unknown(set(overrides) - names, names, "sampling parameter")
        values: dict[str, Any] = {}
        for name in names:
            value = getattr(generation_config, name, None) if generation_config is not None else None
            if value is not None:
                values[name] = value
        values.update({name: value for name, value in overrides.items() if value is not None})
        if "stop_words_ids" in values:
            values["stop_words_ids"] = tuple(tuple(s) for s in values["stop_words_ids"])
        if isinstance(values.get("eos_token_id"), (list, tuple)):
            values["eos_token_id"] = tuple(values["eos_token_id"]) or None
        if values.get("stop_strings") is not None and not isinstance(values["stop_strings"], StopStrings):
            if tokenizer is None:
                raise ValueError(
                    "stop_strings need the tokenizer to find them in the generated tokens: pass tokenizer="
                )
            values["stop_strings"] = StopStrings(values["stop_strings"], tokenizer)
        params = cls(**values)
        for name in ("max_new_tokens", "min_new_tokens"):
            value = getattr(params, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if any(isinstance(i, bool) or not isinstance(i, int) for i in params.eos_ids):
            raise ValueError(f"eos_token_id must be an integer or a list of them: {params.eos_token_id!r}")
        # written so that NaN fails each check
        if params.do_sample and not 0 < params.temperature < math.inf:
            raise ValueError(f"temperature must be > 0 when sampling, got {params.temperature}")
        if not 0 < params.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {params.top_p}")
        if not 0 < params.repetition_penalty < math.inf:
            raise ValueError(f"repetition_penalty must be > 0, got {params.repetition_penalty}")
        if params.logprobs is not None and params.logprobs < 0:
            raise ValueError(f"logprobs must be >= 0, got {params.logprobs}")
        if params.decode_mode not in DECODE_MODES:
            raise ValueError(f"decode_mode must be one of {DECODE_MODES}, got {params.decode_mode!r}")
        return params

    @property
    def greedy(self) -> bool:
        """Whether tokens are chosen by argmax (no sampling, or a temperature too small to sample)."""
        return not self.do_sample or self.temperature < GREEDY_BELOW_TEMPERATURE

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """The end-of-text ids, however eos_token_id was given."""
        eos = self.eos_token_id
        return () if eos is None else eos if isinstance(eos, tuple) else (eos,)

    @property
    def end_ids(self) -> tuple[int, ...]:
        """The ids that end a sequence by themselves: end-of-text ids and one-token stop words."""
        return self.eos_ids + tuple(stop[0] for stop in self.stop_words_ids if len(stop) == 1)

    def with_stop_words(self, stop_words_ids: Sequence[Sequence[int]]) -> SamplingParams:
        merged = list(self.stop_words_ids)
        merged += [tuple(s) for s in stop_words_ids if tuple(s) not in merged]
        return replace(self, stop_words_ids=tuple(merged))


# -- logits to tokens -------------------------------------------------------------------------------


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Divide positive / multiply negative logits of already seen ids (seen: [B, V] bool)."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    threshold = torch.topk(logits, k).values[:, -1:]
    return logits.masked_fill(logits < threshold, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely ids whose probability reaches p (at least one id)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=False)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    drop_sorted = cumulative <= 1 - p
    drop_sorted[:, -1] = False
    drop = drop_sorted.scatter(1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


# A trained model's nucleus almost always lies within its top few hundred ids; sampling among
# these candidates avoids sorting the whole vocabulary at every step (on CPU, milliseconds).
NUCLEUS_CANDIDATES = 1024


def nucleus_by_candidates(device: torch.device) -> bool:
    """Whether top-p sampling first tries the candidates on `device`. Knowing whether they hold the
    nucleus is a wait for the device: on a GPU it would stall the step that runs a step ahead
    (`generation.stream_tokens`) until it ends, where sorting the vocabulary is a few kernels more."""
    return device.type != "cuda"


def _sample_nucleus(logits: torch.Tensor, p: float, generator: torch.Generator | None) -> torch.Tensor | None:
    """Top-p sampling among the top NUCLEUS_CANDIDATES ids; None when the nucleus may be wider."""
    width = min(NUCLEUS_CANDIDATES, logits.shape[-1])
    values, ids = torch.topk(logits, width)  # descending
    probs = (values - torch.logsumexp(logits, -1, keepdim=True)).exp()
    mass_before = probs.cumsum(-1) - probs
    keep = mass_before < p
    if width < logits.shape[-1] and bool(keep[:, -1].any()):
        return None
    weights = probs.masked_fill(~keep, 0.0)
    choice = torch.multinomial(weights, 1, generator=generator)
    return ids.gather(1, choice).squeeze(1)


def choose_tokens(
    logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None, generator: torch.Generator | None
) -> torch.Tensor:
    """Next token per row [B] from last-position logits [B, V]."""
    logits = logits.float()
    if params.repetition_penalty != 1.0 and seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return logits.argmax(-1)
    logits = filter_top_k(logits / params.temperature, params.top_k)
    if params.top_p < 1.0:
        if nucleus_by_candidates(logits.device):
            tokens = _sample_nucleus(logits, params.top_p, generator)
            if tokens is not None:
                return tokens
        logits = filter_top_p(logits, params.top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)
