"""`QwenVLForCausalLM`: the checkpoint's root module and the API users of the original call.

The math lives in `model/`, in the modules it holds; this file is the surface: transformers
integration, `forward` returning logits, `generate`, `chat` and `chat_stream` (decoding through
`decode.Decoder`). Image references found in token ids are read here, before the numeric path,
never inside a module's forward.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .chat_format import (
    CHAT_GENERATION_DEFAULTS,
    DEFAULT_SYSTEM,
    ReplyText,
    decode_reply,
    get_stop_words_ids,
    make_context,
    prompt_settings,
)
from .config import QwenVLConfig
from .generation import SamplingParams, generate_tokens, new_cache, stream_tokens
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

    def _features_for_ids(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        start_id = self.transformer.vision_config.image_start_id
        references = [ref for row in input_ids.tolist() for ref in image_references(row, start_id)]
        return self.encode_images(references) if references else None

    # -- forward -----------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **unused: Any,
    ) -> CausalLMOutputWithPast:
        """Logits of every position, without a cache (prompts are scored whole, as in training).

        Images come as `image_features` [N, 256, H], as `pixel_values` [N, 3, S, S], or, for
        compatibility, as references inside the ids' image spans, read here before the math.
        """
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("forward needs input_ids or inputs_embeds")
            input_ids = input_ids.to(self.device)
            if image_features is None and pixel_values is not None:
                image_features = self.transformer.visual(pixel_values.to(self.device))
            elif image_features is None:
                image_features = self._features_for_ids(input_ids)
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
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(),
                labels[:, 1:].flatten().to(logits.device),
                ignore_index=-100,
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    # -- generation --------------------------------------------------------------------------------

    def _sampling_params(self, generation_config: Any, kwargs: dict[str, Any]) -> SamplingParams:
        kwargs = dict(kwargs)
        if "max_length" in kwargs and "max_new_tokens" not in kwargs:
            raise ValueError("pass max_new_tokens (max_length is not supported)")
        return SamplingParams.from_config(generation_config or self.generation_config, **kwargs)

    def _prompt_rows(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[list[int]]:
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if attention_mask is None:
            return input_ids.tolist()
        # either padding side: keep each row's real tokens
        return [ids[mask.bool()].tolist() for ids, mask in zip(input_ids, attention_mask, strict=True)]

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        generation_config: Any = None,
        stop_words_ids: Sequence[Sequence[int]] | None = None,
        streamer: Any = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Prompt + new ids [B, L], like transformers; rows that stop early are padded with pad id."""
        params = self._sampling_params(generation_config, kwargs)
        if stop_words_ids:
            params = params.with_stop_words(stop_words_ids)
        rows = self._prompt_rows(input_ids, attention_mask)
        features = self._features_for_ids(torch.as_tensor(_pad(rows, 0)))
        if streamer is None:
            new = generate_tokens(self, rows, params, features)
        else:  # transformers' streamer protocol: the prompt, then each new token, then end()
            if len(rows) != 1:
                raise ValueError("a streamer can only follow a single prompt")
            streamer.put(torch.as_tensor([rows[0]]))
            new = [[]]
            for step in stream_tokens(self, rows, params, features):
                new[0].append(step[0])
                streamer.put(torch.as_tensor([step[0]]))
            streamer.end()
        pad = getattr(generation_config or self.generation_config, "pad_token_id", None)
        pad = self.config.pad_token_id if pad is None else pad
        return torch.as_tensor(
            _pad([r + n for r, n in zip(rows, new, strict=True)], pad if pad is not None else 0)
        )

    def _chat_prompt(self, tokenizer, query, history, system, generation_config, kwargs):
        config = generation_config or self.generation_config
        chat_format, max_window = prompt_settings(
            config, kwargs.pop("chat_format", None), kwargs.pop("max_window_size", None)
        )
        stop_words_ids = list(kwargs.pop("stop_words_ids", None) or [])
        kwargs.pop("append_history", None)
        kwargs.pop("stream", None)
        _, prompt = make_context(tokenizer, query, history, system, max_window, chat_format)
        params = self._sampling_params(config, kwargs)
        params = params.with_stop_words(stop_words_ids + get_stop_words_ids(chat_format, tokenizer))
        return prompt, params, chat_format

    def _reply_tokens(
        self, prompt: list[int], params: SamplingParams, prefix_cache: PrefixCache | None
    ) -> Iterator[int]:
        """The reply's tokens as they come. With a prefix cache, the part of the prompt it holds
        (the conversation so far, images included) is not run again, and the finished turn is kept
        in it for the next one."""
        cache = new_cache(self, [prompt], params)
        start = prefix_cache.restore(self, prompt, cache) if prefix_cache is not None else 0
        features = self._features_for_ids(torch.as_tensor([prompt[start:]]))
        new: list[int] = []
        for step in stream_tokens(self, [prompt], params, features, cache):
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
        """
        prompt, params, chat_format = self._chat_prompt(
            tokenizer, query, history, system, generation_config, kwargs
        )
        new = list(self._reply_tokens(prompt, params, prefix_cache))
        response = decode_reply(tokenizer, new, chat_format)
        return response, [*(tuple(turn) for turn in history or ()), (query, response)]

    @torch.no_grad()
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
        """Yield the growing reply as tokens arrive (complete characters only); `prefix_cache` as
        in `chat`."""
        prompt, params, chat_format = self._chat_prompt(
            tokenizer, query, history, system, generation_config, kwargs
        )
        reply = ReplyText(tokenizer, chat_format)
        for token in self._reply_tokens(prompt, params, prefix_cache):
            if reply.add(token):
                yield reply.text
        if reply.finish():
            yield reply.text


def _pad(rows: list[list[int]], pad: int) -> list[list[int]]:
    width = max(len(r) for r in rows)
    return [r + [pad] * (width - len(r)) for r in rows]
