"""`QwenVLForCausalLM`: the checkpoint's root module and the API users of the original call.

The math lives in `model/`, in the modules it holds; this file is the surface: transformers
integration, `forward` returning logits, `generate`, `chat` and `chat_stream` (decoding through
`decode.Decoder`). Image references found in token ids are read here, before the numeric path,
never inside a module's forward.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationConfig, PreTrainedModel
from transformers.generation import GenerateDecoderOnlyOutput
from transformers.modeling_outputs import CausalLMOutputWithPast

from .chat_format import (
    CHAT_GENERATION_DEFAULTS,
    DEFAULT_SYSTEM,
    ReplyText,
    get_stop_words_ids,
    make_context,
    prompt_settings,
)
from .config import QwenVLConfig
from .generation import SamplingParams, collect_rows, new_cache, stream_tokens, streamed
from .generation_options import generation_options
from .in_memory_images import carried_images, find_image
from .model.llm import RMSNorm
from .model.qwenvl import QWenModel
from .model.resampler import CrossAttention, Resampler
from .model.vision import INIT_STD, VisionTransformer, VisualAttention
from .prefix_cache import PrefixCache
from .tokenizer import image_references

logger = logging.getLogger(__name__)


class VisionTower(VisionTransformer):
    """The vision tower with the original's `encode(images)`, which reads them: the tower's math
    (`model.vision`) only sees pixels."""

    @torch.no_grad()
    def encode(self, images: Sequence, policy=None) -> torch.Tensor:
        """Features [N, 256, H] of images given as paths, URLs, bytes or PIL images, read under
        `policy` (images.ImagePolicy; None: the library's); on a GPU through the tower's CUDA graph."""
        from .images import load_image, preprocess
        from .vision_graphs import encode_pixels

        pixels = preprocess([load_image(image, policy) for image in images], self.config.image_size)
        return encode_pixels(self, pixels.to(self.conv1.weight.device))


class QwenVLForCausalLM(PreTrainedModel):
    config_class = QwenVLConfig
    base_model_prefix = "transformer"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["QWenBlock", "VisualBlock"]
    _supports_sdpa = True

    def __init__(self, config: QwenVLConfig):
        super().__init__(config)
        self.transformer = QWenModel(config, vision_tower=VisionTower)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.generation_config = GenerationConfig(**CHAT_GENERATION_DEFAULTS)
        self.image_policy = None  # images.ImagePolicy for references found in prompts; None: the default
        if self.lm_head.weight.device.type != "meta":
            self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        """Fresh weights for training from scratch (loading overwrites every tensor)."""
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
            nn.init.normal_(module.weight, std=INIT_STD)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(
            module, (nn.LayerNorm, RMSNorm, CrossAttention, Resampler, VisionTransformer, VisualAttention)
        ):
            module.reset_parameters()

    # -- transformers surface ----------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, name_or_path, *args: Any, **kwargs: Any) -> QwenVLForCausalLM:
        """Load a folder or hub id; see `qwenvl.loading.load_model` for the options."""
        from .loading import load_model

        return load_model(name_or_path, model_class=cls, **kwargs)

    def save_pretrained(self, save_directory, *args: Any, **kwargs: Any) -> None:
        """Write a folder that from_pretrained loads again; see `qwenvl.loading.save_model`."""
        from .loading import save_model

        save_model(self, save_directory, **kwargs)

    def get_input_embeddings(self) -> nn.Module:
        return self.transformer.wte

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.transformer.wte = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    @classmethod
    def can_generate(cls) -> bool:
        """True: transformers' pipelines ("text-generation") may call `generate`, this class's own."""
        return True

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    # -- images ------------------------------------------------------------------------------------

    def encode_images(self, images: Sequence) -> torch.Tensor:
        """Features [N, 256, H] of images (paths, URLs, bytes, PIL images) under this model's policy."""
        return self.transformer.visual.encode(images, self.image_policy)

    def _features_for_ids(
        self, input_ids: torch.Tensor | Sequence[Sequence[int]], images: Mapping[str, Any] | None = None
    ) -> torch.Tensor | None:
        """Features of the pictures the ids' image spans name (ids [B, L], a tensor or rows of
        ints): a picture given in `images` under its name (see `in_memory_images`), else the path
        or URL the span holds."""
        rows = input_ids.tolist() if isinstance(input_ids, torch.Tensor) else input_ids
        start_id = self.transformer.vision_config.image_start_id
        references = [ref for row in rows for ref in image_references(row, start_id)]
        return self.encode_images([find_image(ref, images) for ref in references]) if references else None

    # -- forward -----------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        images: Mapping[str, Any] | None = None,
        **unused: Any,
    ) -> CausalLMOutputWithPast:
        """Logits of every position, without a cache (prompts are scored whole, as in training).

        Images come as `image_features` [N, 256, H], as `pixel_values` [N, 3, S, S], or, for
        compatibility, as references inside the ids' image spans, read here before the math (a
        picture in memory from `images`, as `tokenizer(text)` returns them).
        """
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("forward needs input_ids or inputs_embeds")
            input_ids = input_ids.to(self.device)
            if image_features is None and pixel_values is not None:
                visual = self.transformer.visual
                image_features = visual(pixel_values.to(visual.conv1.weight.device))
            elif image_features is None:
                image_features = self._features_for_ids(input_ids, images)
            inputs_embeds = self.transformer.embed(input_ids, image_features)
        lengths = None
        if attention_mask is not None:  # right padding: real tokens never attend to the pads after them
            if bool((attention_mask[:, 0] == 0).any()):
                raise ValueError(
                    "forward() takes right-padded rows (attention_mask starting with 1); "
                    "generate() accepts either side"
                )
            lengths = attention_mask.sum(-1).tolist()
        hidden = self.transformer(inputs_embeds, None, lengths)
        logits = self.lm_head(hidden.to(self.device))  # a spread model's final norm may be elsewhere
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(),
                labels[:, 1:].flatten().to(logits.device),
                ignore_index=-100,
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    # -- generation --------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        inputs: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        *,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        stop_words_ids: Sequence[Sequence[int]] | None = None,
        streamer: Any = None,
        tokenizer: Any = None,
        images: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor | GenerateDecoderOnlyOutput:
        """Prompt + new ids [B, L], as transformers' generate: rows that stop early are padded with
        the pad id.

        `inputs` or `input_ids`: the prompts' ids, [L] or [B, L] (either padding side, under
        `attention_mask`). `generation_config` and keyword arguments: transformers' options that
        this decoder honours (`generation_options`; any other is a ValueError naming it), with
        `tokenizer` for stop_strings; `stop_words_ids`: the original Qwen's. `streamer`:
        transformers' protocol (TextStreamer, TextIteratorStreamer). `images`: the in-memory
        pictures the spans name, as `tokenizer(text)` gives them.
        """
        try:
            ids = _prompt_ids(inputs, input_ids, generation_config)
            options = generation_options(
                "generate",
                self.generation_config,
                generation_config,
                kwargs,
                prompt_width=ids.shape[-1],
                tokenizer=tokenizer,
                default_pad=self.config.pad_token_id,
            )
            params = options.params.with_stop_words(stop_words_ids or ())
            # num_return_sequences samples each prompt again, its rows next to each other
            count = options.num_return_sequences
            rows = [row for row in self._prompt_rows(ids, attention_mask) for _ in range(count)]
            features = self._features_for_ids(rows, images)
        except BaseException:
            _end(streamer)
            raise
        steps = stream_tokens(self, rows, params, features)
        if streamer is not None:
            steps = streamed(steps, streamer, ids, options.pad_token_id)
        new = collect_rows(steps, len(rows))
        out = torch.as_tensor(_pad([r + n for r, n in zip(rows, new, strict=True)], options.pad_token_id))
        return GenerateDecoderOnlyOutput(sequences=out) if options.return_dict_in_generate else out

    def _prompt_rows(self, input_ids: torch.Tensor, attention_mask: Any) -> list[list[int]]:
        if attention_mask is None:
            return input_ids.tolist()
        # either padding side: keep each row's real tokens
        mask = torch.as_tensor(attention_mask, device=input_ids.device).reshape(input_ids.shape).bool()
        return [ids[keep].tolist() for ids, keep in zip(input_ids, mask, strict=True)]

    def _chat_turn(self, caller, tokenizer, query, history, system, generation_config, prefix_cache, kwargs):
        """(the reply's text, its tokens as they will come) of a chat turn: the original's chat
        keywords (chat_format, max_window_size, stop_words_ids, stream) and a `streamer` taken here,
        the rest checked by `generation_options` (any it cannot honour is a ValueError naming it)."""
        streamer = kwargs.pop("streamer", None)
        try:
            if kwargs.pop("stream", None):
                raise ValueError(f"{caller}(stream=True): chat() returns the whole reply; use chat_stream()")
            chat_format, max_window = prompt_settings(
                self.generation_config,  # below what the call and its generation_config set
                kwargs.pop("chat_format", None) or getattr(generation_config, "chat_format", None),
                kwargs.pop("max_window_size", None) or getattr(generation_config, "max_window_size", None),
            )
            stop_words_ids = list(kwargs.pop("stop_words_ids", None) or [])
            _, prompt = make_context(tokenizer, query, history, system, max_window, chat_format)
            options = generation_options(
                caller,
                self.generation_config,
                generation_config,
                kwargs,
                prompt_width=len(prompt),
                tokenizer=tokenizer,
                returns_ids=False,
            )
            stop_words_ids += get_stop_words_ids(chat_format, tokenizer)
            params = options.params.with_stop_words(stop_words_ids)
            reply = ReplyText(tokenizer, chat_format, _stop_texts(params))
            images = carried_images(query, history, system)
        except BaseException:
            _end(streamer)
            raise
        return reply, self._reply_tokens(prompt, params, prefix_cache, images, streamer)

    def _reply_tokens(
        self,
        prompt: list[int],
        params: SamplingParams,
        prefix_cache: PrefixCache | None,
        images: Mapping[str, Any] | None = None,
        streamer: Any = None,
    ) -> Iterator[int]:
        """The reply's tokens as they come. With a prefix cache, the part of the prompt it holds
        (the conversation so far, images included) is not run again, and the finished turn is kept
        in it for the next one. `images`: the in-memory pictures the spans may name; `streamer`:
        a transformers streamer shown the prompt and the tokens."""
        try:
            cache = new_cache(self, [prompt], params)
            start = prefix_cache.restore(self, prompt, cache) if prefix_cache is not None else 0
            features = self._features_for_ids([prompt[start:]], images)
        except BaseException:
            _end(streamer)
            raise
        steps = stream_tokens(self, [prompt], params, features, cache)
        if streamer is not None:
            pad = params.eos_ids[0] if params.eos_ids else 0  # shown for no row: there is one
            steps = streamed(steps, streamer, torch.as_tensor([prompt]), pad)
        new: list[int] = []
        for step in steps:
            new.append(step[0])
            yield step[0]
        if prefix_cache is not None and new:
            # the cache holds every generated token but the last, which was never fed back
            prefix_cache.keep(prompt + new[:-1], cache)

    @torch.no_grad()
    def chat(
        self,
        tokenizer,
        query: str,
        history: Sequence[tuple[str, str]] | None = None,
        system: str = DEFAULT_SYSTEM,
        generation_config: Any = None,
        prefix_cache: PrefixCache | None = None,
        **kwargs: Any,
    ) -> tuple[str, list[tuple[str, str]]]:
        """One turn of conversation: (response, history with (query, response) appended).

        `prefix_cache`: a `qwenvl.PrefixCache` passed to every turn of one conversation; each turn
        then runs only its new tokens through the model (the same reply as without it, up to the
        rounding of keys and values computed a token at a time rather than in one pass).
        Keyword arguments: the original's (chat_format, max_window_size, stop_words_ids,
        append_history=False: the history returned without this turn), a transformers `streamer`,
        and generation options as in `generate` (stop_strings end the reply before them).
        """
        append_history = kwargs.pop("append_history", True)
        reply, tokens = self._chat_turn(
            "chat", tokenizer, query, history, system, generation_config, prefix_cache, kwargs
        )
        reply.tokens.extend(tokens)
        response = reply.finish()
        turns = [tuple(turn) for turn in history or ()]
        return response, [*turns, (query, response)] if append_history else turns

    def chat_stream(
        self,
        tokenizer,
        query: str,
        history: Sequence[tuple[str, str]] | None = None,
        system: str = DEFAULT_SYSTEM,
        generation_config: Any = None,
        prefix_cache: PrefixCache | None = None,
        **kwargs: Any,
    ) -> Iterator[str]:
        """The growing reply as tokens arrive (complete characters only); `prefix_cache` and keyword
        arguments as in `chat` (but append_history). Options are checked here, at the call."""
        reply, tokens = self._chat_turn(
            "chat_stream", tokenizer, query, history, system, generation_config, prefix_cache, kwargs
        )
        return self._grown_reply(reply, tokens)

    @torch.no_grad()
    def _grown_reply(self, reply: ReplyText, tokens: Iterator[int]) -> Iterator[str]:
        for token in tokens:
            if reply.add(token):
                yield reply.text
        if reply.finish():
            yield reply.text


def _prompt_ids(inputs: Any, input_ids: Any, generation_config: Any) -> torch.Tensor:
    """generate()'s prompt ids as [B, L], given as `inputs` or `input_ids` (transformers takes both)."""
    if isinstance(generation_config, torch.Tensor):
        raise ValueError(
            "generate()'s second positional argument is generation_config, as in transformers: "
            "pass attention_mask= by name"
        )
    if inputs is not None and input_ids is not None:
        raise ValueError("generate() got the prompt twice: pass inputs or input_ids, not both")
    ids = inputs if inputs is not None else input_ids
    if ids is None:
        raise ValueError("generate() needs the prompt's ids: inputs= or input_ids=")
    if isinstance(ids, Mapping):
        raise ValueError("pass a tokenizer's output as keyword arguments: model.generate(**inputs)")
    ids = torch.as_tensor(ids)
    if ids.dim() not in (1, 2) or ids.dtype.is_floating_point:
        raise ValueError(f"prompt ids must be integers shaped [L] or [B, L]: {ids.dtype} {list(ids.shape)}")
    return ids if ids.dim() == 2 else ids[None]


def _stop_texts(params: SamplingParams) -> tuple[str, ...]:
    return params.stop_strings.strings if params.stop_strings is not None else ()


def _pad(rows: list[list[int]], pad: int) -> list[list[int]]:
    width = max(len(r) for r in rows)
    return [r + [pad] * (width - len(r)) for r in rows]


def _end(streamer: Any) -> None:
    """A streamer's end when generation fails before its first token: a reader waiting on it (a
    TextIteratorStreamer in another thread) must not hang."""
    if streamer is not None:
        streamer.end()
