"""Generation as small functions over a model and a KV cache: prefill, decode step, sampling, stopping.

The model only maps embeddings to hidden states; everything about choosing tokens lives here.
Prompts of different lengths are right-padded and keep their own cache lengths, so each row of a
batch produces what it would produce alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch

from .cache import KVCache
from .cpu_weights import head_logits
from .static_decode import MODES, DecodeRunner
from .transfers import to_device, to_host

# "plain": decode_step, reading the cache up to its longest row (the length comes from the host);
# the others run the same step with static shapes and no host sync (static_decode.py)
DECODE_MODES = ("auto", "plain", *MODES)


class PromptTooLongError(ValueError):
    """A prompt that does not fit the model's context window."""


# Below this temperature sampling is greedy decoding (vLLM's rule too): dividing fp32 logits by a
# smaller one overflows to inf, and the softmax of inf is NaN.
GREEDY_BELOW_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 512
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop_words_ids: tuple[tuple[int, ...], ...] = ()
    eos_token_id: int | None = None
    seed: int | None = None
    # one of DECODE_MODES; "auto": CUDA graphs on a GPU, static steps on CPU
    decode_mode: str = "auto"
    extra: dict = field(default_factory=dict, compare=False)

    @classmethod
    def from_config(cls, generation_config: Any = None, **overrides: Any) -> SamplingParams:
        """Values from a transformers GenerationConfig (or anything with those attributes), then overrides."""
        names = {f.name for f in fields(cls)} - {"extra", "stop_words_ids"}
        values: dict[str, Any] = {}
        for name in names:
            value = getattr(generation_config, name, None) if generation_config is not None else None
            if value is not None:
                values[name] = value
        for name, value in overrides.items():
            if value is None:
                continue
            if name in names:
                values[name] = value
            elif name == "stop_words_ids":
                values[name] = tuple(tuple(s) for s in value)
        if isinstance(values.get("eos_token_id"), (list, tuple)):
            values["eos_token_id"] = values["eos_token_id"][0] if values["eos_token_id"] else None
        params = cls(**values)
        if params.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {params.max_new_tokens}")
        # written so that NaN fails each check
        if params.do_sample and not 0 < params.temperature < math.inf:
            raise ValueError(f"temperature must be > 0 when sampling, got {params.temperature}")
        if not 0 < params.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {params.top_p}")
        if not 0 < params.repetition_penalty < math.inf:
            raise ValueError(f"repetition_penalty must be > 0, got {params.repetition_penalty}")
        if params.decode_mode not in DECODE_MODES:
            raise ValueError(f"decode_mode must be one of {DECODE_MODES}, got {params.decode_mode!r}")
        return params

    @property
    def greedy(self) -> bool:
        """Whether tokens are chosen by argmax (no sampling, or a temperature too small to sample)."""
        return not self.do_sample or self.temperature < GREEDY_BELOW_TEMPERATURE

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
    (`tokens_a_step_ahead`) until it ends, where sorting the vocabulary is a few kernels more."""
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


# -- model steps ------------------------------------------------------------------------------------


@torch.no_grad()
def prefill(
    model, rows: Sequence[Sequence[int]], cache: KVCache, image_features: torch.Tensor | None = None
) -> torch.Tensor:
    """Run the prompts into the cache; logits [B, V] at each row's last prompt token.

    Into a fresh cache, the host waits for the GPU nowhere before the logits: the ids are found on
    the host and copied like kernels (transfers.to_device), so the prefill's kernels are launched
    while the GPU still runs what came before, e.g. an image's encoding replayed as a CUDA graph.
    """
    device = cache.lengths.device
    lengths = [len(r) for r in rows]
    ids = torch.zeros(len(rows), max(lengths), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.as_tensor(list(row), dtype=torch.long)
    hidden = model.transformer(model.transformer.embed(ids, image_features), cache, lengths)
    last = hidden[torch.arange(len(rows), device=device), to_device(torch.tensor(lengths) - 1, device)]
    return head_logits(model, last)


@torch.no_grad()
def decode_step(model, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Feed one token per row [B]; logits [B, V] of the next."""
    hidden = model.transformer(model.transformer.embed(tokens[:, None]), cache)
    return head_logits(model, hidden[:, -1])


def make_decoder(model, cache: KVCache, mode: str = "auto") -> Callable[[torch.Tensor], torch.Tensor]:
    """A function feeding one token per row [B] into `cache` and returning the next logits [B, V].

    "auto": a CUDA graph on a GPU (one capture, about two steps' time, then each step costs what
    reading the weights costs: 6.5 ms instead of 25 for Qwen-VL on an H100), static steps on CPU.
    """
    if mode == "auto":
        mode = "cuda_graph" if cache.keys.is_cuda else "static"
    if mode == "plain":
        return lambda tokens: decode_step(model, tokens, cache)
    return DecodeRunner(model, cache, mode)


# -- the loop ---------------------------------------------------------------------------------------


def tokens_a_step_ahead(
    first: torch.Tensor, following: Callable[[torch.Tensor], torch.Tensor], steps: int
) -> Iterator[list[int]]:
    """Yield `steps` steps' tokens [B] as lists, `first` then each `following(previous)`; on a GPU
    while it already computes the step after the one yielded.

    A GPU would otherwise idle each step while the host reads a token and launches the next step
    (0.13 ms of a 4.5 ms batch-1 step on an H200). A caller that stops early there leaves one step
    computed for nothing (its cache rows a token longer than the tokens kept). On CPU nothing
    runs while the host reads, and a step is computed only once it is asked for.
    """
    tokens = first
    for step in range(steps):
        last = step == steps - 1
        if tokens.is_cuda:
            read = to_host(tokens)
            if not last:
                tokens = following(tokens)
            yield read()
        else:
            yield tokens.tolist()
            if not last:
                tokens = following(tokens)


def is_finished(token: int, generated: list[int], params: SamplingParams) -> bool:
    """Whether `token`, just appended to `generated`, ends the sequence (end-of-text or a stop word)."""
    if token == params.eos_token_id:
        return True
    return any(len(s) and generated[-len(s) :] == list(s) for s in params.stop_words_ids)


def context_limit(model) -> int:
    return model.config.max_position_embeddings


def max_new_tokens(model, prompts: Sequence[Sequence[int]], params: SamplingParams) -> int:
    """How many tokens the prompts may get (0 or less: none); PromptTooLongError past the context."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    limit = context_limit(model)
    longest = max(len(p) for p in prompts)
    if longest > limit:
        raise PromptTooLongError(f"the prompt is {longest} tokens; the model's context window is {limit}")
    return min(params.max_new_tokens, limit - longest)


def new_cache(model, prompts: Sequence[Sequence[int]], params: SamplingParams) -> KVCache:
    """An empty cache with room for the prompts and the tokens they may get."""
    room = max(len(p) for p in prompts) + max(max_new_tokens(model, prompts, params), 0)
    param = next(model.parameters())
    return KVCache(model.transformer.llm_config, len(prompts), room, param.dtype, param.device)


def stream_tokens(
    model,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    image_features: torch.Tensor | None = None,
    cache: KVCache | None = None,
) -> Iterator[list[int | None]]:
    """Yield, at each step, the new token of every row (None for a row that has finished).

    A row finishes after a stop word or the end-of-text id (both are yielded), or at max_new_tokens.
    `cache` (from `new_cache`, else one is made) may already hold the start of each row's prompt
    (`PrefixCache.restore`): only the rest runs, and `image_features` are those of its images.
    """
    max_new = max_new_tokens(model, prompts, params)
    if max_new <= 0:
        return
    param = next(model.parameters())
    if cache is None:
        cache = new_cache(model, prompts, params)
    starts = cache.lengths.tolist()
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=param.device).manual_seed(params.seed)
    seen = None
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(len(prompts), model.config.vocab_size, dtype=torch.bool, device=param.device)
        for i, p in enumerate(prompts):
            seen[i, torch.as_tensor(list(p), device=param.device)] = True

    generated: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    logits = prefill(
        model, [p[start:] for p, start in zip(prompts, starts, strict=True)], cache, image_features
    )
    advance = make_decoder(model, cache, params.decode_mode)

    def following(tokens: torch.Tensor) -> torch.Tensor:
        if seen is not None:
            seen[torch.arange(len(prompts), device=param.device), tokens] = True
        return choose_tokens(advance(tokens), params, seen, generator)

    first = choose_tokens(logits, params, seen, generator)
    for tokens in tokens_a_step_ahead(first, following, max_new):
        out: list[int | None] = []
        for i, token in enumerate(tokens):
            if done[i]:
                out.append(None)
                continue
            generated[i].append(token)
            out.append(token)
            if is_finished(token, generated[i], params):
                done[i] = True
        yield out
        if all(done):
            return


def generate_tokens(
    model,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    image_features: torch.Tensor | None = None,
) -> list[list[int]]:
    """The new ids of every row."""
    rows: list[list[int]] = [[] for _ in prompts]
    for step in stream_tokens(model, prompts, params, image_features):
        for row, token in zip(rows, step, strict=True):
            if token is not None:
                row.append(token)
    return rows
