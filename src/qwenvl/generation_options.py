"""What `generate`, `chat` and `chat_stream` accept: transformers' generation options and Qwen-VL's
own, turned into `SamplingParams`. An option this decoder cannot honour is a ValueError that
names it, never silently ignored; a misspelled one names the spelling it may mean.

Settings come, lowest first, from the model's `generation_config`, a `generation_config` passed
in (its unset values fall back to the model's, as in transformers), then keyword arguments (None:
not given).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from transformers import GenerationConfig

from .decode.sampling import SamplingParams, refuse_unknown

logger = logging.getLogger(__name__)

# GenerationConfig's names that SamplingParams holds, and qwenvl's own sampling options
SAMPLING_OPTIONS = frozenset(
    {
        "max_new_tokens",
        "min_new_tokens",
        "do_sample",
        "temperature",
        "top_p",
        "top_k",
        "repetition_penalty",
        "eos_token_id",
        "stop_strings",
        "stop_words_ids",  # the original Qwen's, also read from its generation_config
        "seed",
        "decode_mode",
    }
)
# lengths that count the prompt: turned into new-token counts here
LENGTH_OPTIONS = frozenset({"max_length", "min_length"})
# what generate() returns
OUTPUT_OPTIONS = frozenset({"pad_token_id", "num_return_sequences", "return_dict_in_generate"})
# Accepted without effect on the tokens chosen: how transformers computes rather than what (its
# caches, compilation, memory), settings of the decodings refused below, token ids the prompt
# already holds, the original Qwen's prompt settings, and token_type_ids (which its tokenizer
# returns and its model ignores).
NO_EFFECT = frozenset(
    {
        "use_cache",
        "cache_implementation",
        "cache_config",
        "max_cache_len",
        "compile_config",
        "disable_compile",
        "low_memory",
        "prefill_chunk_size",
        "continuous_batching_config",
        "length_penalty",
        "early_stopping",
        "num_assistant_tokens",
        "num_assistant_tokens_schedule",
        "assistant_confidence_threshold",
        "assistant_lookbehind",
        "target_lookbehind",
        "max_matching_ngram_size",
        "is_assistant",
        "assistant_ensemble_weight",
        "speculation_type",
        "bos_token_id",
        "decoder_start_token_id",
        "chat_format",
        "max_window_size",
        "token_type_ids",
    }
)

BEAMS = "beam search: qwenvl decodes one sequence per prompt, greedily or by sampling"
ASSISTED = "assisted or speculative decoding"
NO_SCORES = "scores, logits, attentions, hidden states: qwenvl's generate returns token ids"
# Options this decoder cannot honour: the values that ask for nothing, and what the others need.
UNSUPPORTED: dict[str, tuple[tuple[Any, ...], str]] = {
    "num_beams": ((1,), BEAMS),
    "num_beam_groups": ((1,), BEAMS),
    "diversity_penalty": ((0.0,), BEAMS),
    "constraints": ((), "constrained beam search"),
    "force_words_ids": ((), "constrained beam search"),
    "penalty_alpha": ((0.0,), "contrastive search"),
    "dola_layers": ((), "DoLa decoding"),
    "assistant_model": ((), ASSISTED),
    "assistant_tokenizer": ((), ASSISTED),
    "prompt_lookup_num_tokens": ((), ASSISTED),
    "assistant_early_exit": ((), ASSISTED),
    "use_mtp": ((False,), ASSISTED),
    "min_p": ((0.0,), "min-p sampling"),
    "top_h": ((), "top-h sampling"),
    "typical_p": ((1.0,), "typical sampling"),
    "epsilon_cutoff": ((0.0,), "epsilon sampling"),
    "eta_cutoff": ((0.0,), "eta sampling"),
    "no_repeat_ngram_size": ((0,), "n-gram blocking"),
    "encoder_no_repeat_ngram_size": ((0,), "an encoder-decoder model"),
    "encoder_repetition_penalty": ((1.0,), "an encoder-decoder model"),
    "bad_words_ids": ((), "banned words"),
    "sequence_bias": ((), "sequence biases"),
    "suppress_tokens": ((), "suppressed tokens"),
    "begin_suppress_tokens": ((), "suppressed tokens"),
    "forced_bos_token_id": ((), "forced tokens"),
    "forced_eos_token_id": ((), "forced tokens"),
    "exponential_decay_length_penalty": ((), "a length penalty"),
    "renormalize_logits": ((False,), "transformers' logits processors"),
    "remove_invalid_values": ((False,), "transformers' logits processors"),
    "guidance_scale": ((1.0,), "classifier-free guidance"),
    "negative_prompt_ids": ((), "classifier-free guidance"),
    "negative_prompt_attention_mask": ((), "classifier-free guidance"),
    "watermarking_config": ((), "watermarking"),
    "token_healing": ((False,), "token healing"),
    "max_time": ((), "a time limit"),
    "logits_processor": (
        (),
        "transformers' logits processors: qwenvl has repetition_penalty and min_new_tokens",
    ),
    "stopping_criteria": (
        (),
        "transformers' stopping criteria: qwenvl has stop_strings, stop_words_ids, eos_token_id",
    ),
    "prefix_allowed_tokens_fn": ((), "constrained decoding"),
    "custom_generate": ((), "custom decoding loops"),
    "synced_gpus": ((False,), "GPUs synced for sharded models"),
    "inputs_embeds": ((), "prompts as embeddings: qwenvl reads pictures from the ids' image spans"),
    "output_scores": ((False,), NO_SCORES),
    "output_logits": ((False,), NO_SCORES),
    "output_attentions": ((False,), NO_SCORES),
    "output_hidden_states": ((False,), NO_SCORES),
}
KNOWN = SAMPLING_OPTIONS | LENGTH_OPTIONS | OUTPUT_OPTIONS | NO_EFFECT | frozenset(UNSUPPORTED)
# a config's entries that describe it rather than the generation
METADATA = frozenset({"transformers_version"})


@dataclass(frozen=True)
class GenerationOptions:
    params: SamplingParams
    pad_token_id: int  # what generate() pads rows that end early with
    num_return_sequences: int
    return_dict_in_generate: bool


def generation_options(
    caller: str,
    model_config: Any,
    generation_config: Any,
    options: Mapping[str, Any],
    *,
    prompt_width: int,
    tokenizer: Any = None,
    default_pad: int | None = None,
    returns_ids: bool = True,
) -> GenerationOptions:
    """The options of one `caller` ("generate", "chat"...) call. `options`: its keyword arguments
    left once it took its own; `prompt_width`: what max_length and min_length count besides new
    tokens; `tokenizer`: for stop strings; `returns_ids`: whether the caller returns token ids
    (chat returns text: no more than one sequence, no output dict)."""
    refuse_unknown(set(options) - KNOWN, KNOWN, f"{caller}() keyword argument")
    if generation_config is not None and not hasattr(generation_config, "__dict__"):
        raise ValueError(
            f"generation_config must be a transformers.GenerationConfig: {type(generation_config).__name__}"
        )
    model = _settings(model_config, "the model's generation_config")
    given = _settings(generation_config, "generation_config")
    given.update({name: value for name, value in options.items() if value is not None})
    merged = {**model, **given}
    _refuse_unsupported(caller, merged)

    sampling = {name: merged[name] for name in SAMPLING_OPTIONS & set(merged)}
    sampling["max_new_tokens"] = _new_tokens("max", given, model, prompt_width)
    sampling["min_new_tokens"] = _new_tokens("min", given, model, prompt_width)
    params = SamplingParams.from_config(None, tokenizer=tokenizer, **sampling)

    count = merged.get("num_return_sequences", 1)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"num_return_sequences must be a positive integer, got {count!r}")
    if count > 1 and not returns_ids:
        raise ValueError(f"{caller}() returns one reply: num_return_sequences must be 1, got {count}")
    if count > 1 and params.greedy:
        raise ValueError(
            f"num_return_sequences={count} without sampling repeats one greedy sequence: pass do_sample=True"
        )
    return_dict = bool(merged.get("return_dict_in_generate", False))
    if return_dict and not returns_ids:
        raise ValueError(f"{caller}() returns text: return_dict_in_generate must be False")
    pad = merged.get("pad_token_id", default_pad)
    if pad is None:
        pad = params.eos_ids[0] if params.eos_ids else 0
    return GenerationOptions(params, pad, count, return_dict)


def _settings(config: Any, where: str) -> dict[str, Any]:
    """A generation config's set values (a GenerationConfig, or any object or mapping of them);
    ValueError for a setting no one knows, which could not be honoured."""
    if config is None:
        return {}
    items = dict(config) if isinstance(config, Mapping) else vars(config)
    # a GenerationConfig's defaults are unset values (None since transformers 5)
    defaults = _defaults(type(config)) if isinstance(config, GenerationConfig) else {}
    found = {
        name: value
        for name, value in items.items()
        if value is not None
        and not name.startswith("_")
        and name not in METADATA
        and not _equal(value, defaults.get(name))
    }
    refuse_unknown(set(found) - KNOWN, KNOWN, f"{where} setting")
    return found


@functools.cache
def _defaults(config_class: type) -> dict[str, Any]:
    return {name: value for name, value in vars(config_class()).items() if value is not None}


def _equal(value: Any, default: Any) -> bool:
    try:
        return default is not None and bool(value == default)
    except Exception:  # a tensor, or a value that compares elementwise
        return False


def _asks_nothing(value: Any, neutral: Collection[Any]) -> bool:
    if value is None:
        return True
    if isinstance(value, (list, tuple, dict)):  # an empty LogitsProcessorList among them
        return len(value) == 0
    return isinstance(value, (bool, int, float, str)) and value in neutral


def _refuse_unsupported(caller: str, merged: Mapping[str, Any]) -> None:
    refused = [
        f"{name}={_shown(value)} ({UNSUPPORTED[name][1]})"
        for name, value in sorted(merged.items())
        if name in UNSUPPORTED and not _asks_nothing(value, UNSUPPORTED[name][0])
    ]
    if refused:
        raise ValueError(f"{caller}() cannot honour " + "; ".join(refused))


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else type(value).__name__


def _new_tokens(
    bound: str, given: Mapping[str, Any], model: Mapping[str, Any], prompt_width: int
) -> int | None:
    """max_new_tokens (bound "max") or min_new_tokens ("min"): from the caller's settings, else
    the model's; in each, the count of new tokens wins over the length that counts the prompt,
    as in transformers. None: not set."""
    new_name, length_name = f"{bound}_new_tokens", f"{bound}_length"
    for layer in (given, model):
        if new_name in layer:
            if length_name in layer and layer is given:
                logger.warning("both %s and %s are set: %s is used", new_name, length_name, new_name)
            return layer[new_name]
        if length_name in layer:
            length = layer[length_name]
            if bound == "max" and length <= prompt_width:
                raise ValueError(
                    f"max_length={length} leaves no room after the prompt's {prompt_width} tokens: "
                    f"pass max_new_tokens"
                )
            return max(length - prompt_width, 0)
    return None
