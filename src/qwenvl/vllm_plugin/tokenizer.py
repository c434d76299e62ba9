"""qwenvl's tiktoken tokenizer with the surface vLLM calls (its `TokenizerLike`), and the chat template.

AutoTokenizer finds it under the name official folders give (`QWenTokenizer`, see `register`), so
vLLM's default tokenizer mode loads it with no remote code. Chat prompts are built by
`chat.conversation_prompt`, token for token as `model.chat` builds them; a chat template passed to
vLLM (`--chat-template`) is rendered instead, as transformers' tokenizers do.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from ..tokenizer import IMEND, SPECIAL_TOKENS, QwenVLTokenizer
from .chat import CHAT_TEMPLATE, conversation_prompt


class QwenVLTokenizerForVllm(QwenVLTokenizer):
    """Byte-level tokens (`convert_ids_to_tokens` gives bytes) suit vLLM's slow incremental
    detokenizer, which joins them with `convert_tokens_to_string`; there is no added vocabulary."""

    # A Qwen-VL-Chat turn ends with <|im_end|>; vLLM stops at the tokenizer's end token and adds
    # generation_config.json's <|endoftext|>, which ends the base model's text.
    eos_token = IMEND
    bos_token_id = None
    chat_template = CHAT_TEMPLATE

    def __init__(self, *args: Any, truncation_side: str = "left", **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.truncation_side = truncation_side

    @classmethod
    def from_pretrained(
        cls, path_or_repo_id: str | os.PathLike, *args: Any, download_dir: str | None = None, **kwargs: Any
    ) -> QwenVLTokenizerForVllm:
        options = {
            k: kwargs[k] for k in ("revision", "token", "local_files_only") if kwargs.get(k) is not None
        }
        cache_dir = kwargs.get("cache_dir") or download_dir
        tokenizer = super().from_pretrained(path_or_repo_id, cache_dir=cache_dir, **options)
        tokenizer.truncation_side = kwargs.get("truncation_side", "left")
        return tokenizer

    @property
    def eos_token_id(self) -> int:
        return self.im_end_id

    @property
    def all_special_tokens(self) -> list[str]:
        return list(SPECIAL_TOKENS)

    @property
    def is_fast(self) -> bool:
        # tiktoken is fast, but vLLM's "fast" path needs a `tokenizers` backend and offsets
        return False

    @property
    def max_token_id(self) -> int:
        return self.vocab_size - 1

    @property
    def max_chars_per_token(self) -> int:
        return max(len(token) for token in self.get_vocab())

    def num_special_tokens_to_add(self) -> int:
        return 0

    def get_added_vocab(self) -> dict[str, int]:
        return {}

    def encode(
        self,
        text: str,
        truncation: bool | None = None,
        max_length: int | None = None,
        add_special_tokens: bool = True,
        **kwargs: Any,
    ) -> list[int]:
        """Ids of `text`, as qwenvl encodes it (special tokens allowed, `<img></img>` an image span);
        cut to `max_length` on the truncation side when asked."""
        ids = super().encode(text, **kwargs)
        if truncation and max_length is not None and len(ids) > max_length:
            ids = ids[-max_length:] if self.truncation_side == "left" else ids[:max_length]
        return ids

    def __call__(self, text: str | list[str], text_pair: str | None = None, **kwargs: Any):
        if text_pair is not None:
            raise ValueError("the Qwen-VL tokenizer encodes one text, not text pairs")
        kwargs.pop("add_special_tokens", None)
        return super().__call__(text, **kwargs)

    def convert_ids_to_tokens(self, ids: int | Sequence[int], skip_special_tokens: bool = False):
        """Tokens of ids; an id past the vocabulary (the model's padded rows) is None, as vLLM expects."""
        if isinstance(ids, int):
            return self._decoder.get(ids)
        return [self._decoder.get(i) for i in ids if not (skip_special_tokens and i >= self.eod_id)]

    def get_chat_template(self, chat_template: str | None = None, tools: Any = None) -> str:
        # a request with tools is refused where the prompt is built, with its own message
        return chat_template or CHAT_TEMPLATE

    def apply_chat_template(
        self,
        conversation: Sequence[Mapping[str, Any]],
        tools: Any = None,
        chat_template: str | None = None,
        tokenize: bool = True,
        add_generation_prompt: bool = False,
        continue_final_message: bool = False,
        return_dict: bool = False,
        **kwargs: Any,
    ) -> str | list[int]:
        """The ChatML prompt: its ids (`tokenize`) or its text."""
        if tools:
            raise ValueError("Qwen-VL-Chat's prompt format has no tools")
        if return_dict:
            raise ValueError("the Qwen-VL tokenizer returns a chat prompt's ids or text, not a dict")
        if chat_template is not None and chat_template != CHAT_TEMPLATE:
            text = _render(chat_template, conversation, add_generation_prompt, continue_final_message, kwargs)
            return self.encode(text) if tokenize else text
        text, ids = conversation_prompt(self, conversation, add_generation_prompt, continue_final_message)
        return ids if tokenize else text


def _render(
    template: str,
    conversation: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool,
    continue_final_message: bool,
    extra: Mapping[str, Any],
) -> str:
    """A chat template of the caller's own, rendered in the sandbox transformers uses."""
    from transformers.utils.chat_template_utils import _compile_jinja_template

    return _compile_jinja_template(template).render(
        messages=list(conversation),
        add_generation_prompt=add_generation_prompt,
        continue_final_message=continue_final_message,
        **extra,
    )
