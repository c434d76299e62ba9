"""Make transformers' Auto classes return qwenvl's classes for Qwen-VL folders, without remote code."""

from __future__ import annotations

from typing import Any, NoReturn

from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

from .config import MODEL_TYPE, QwenVLConfig
from .modeling import QwenVLForCausalLM
from .tokenizer import QWenTokenizer, QwenVLTokenizer

IMAGE_TEXT_TO_TEXT_REFUSAL = (
    "Qwen-VL has no transformers processor or chat template, which transformers' image-text-to-text "
    "pipeline and AutoModelForImageTextToText need. Load it with AutoModelForCausalLM.from_pretrained "
    "(or qwenvl.QwenVLForCausalLM) and ask model.chat(tokenizer, query), a picture in the query as "
    "tokenizer.from_list_format([{'image': path}, {'text': question}]); to serve many requests at "
    "once, use qwenvl.engine.Engine (or the `qwenvl serve` command)."
)


class ImageTextToTextRefusal:
    """What AutoModelForImageTextToText, and so `pipeline("image-text-to-text", model=folder)`,
    finds for a Qwen-VL config: a ValueError naming the API to use, before any weight is read."""

    config_class = QwenVLConfig

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> NoReturn:
        raise ValueError(IMAGE_TEXT_TO_TEXT_REFUSAL)

    @classmethod
    def from_config(cls, *args: Any, **kwargs: Any) -> NoReturn:
        raise ValueError(IMAGE_TEXT_TO_TEXT_REFUSAL)


def register() -> None:
    """Idempotent: safe to call again after another library registered "qwen"."""
    AutoConfig.register(MODEL_TYPE, QwenVLConfig, exist_ok=True)
    AutoModelForCausalLM.register(QwenVLConfig, QwenVLForCausalLM, exist_ok=True)
    AutoModelForImageTextToText.register(QwenVLConfig, ImageTextToTextRefusal, exist_ok=True)
    # Official folders name "QWenTokenizer"; aliasing it to our class makes AutoTokenizer pick it.
    AutoTokenizer.register(
        QwenVLConfig, slow_tokenizer_class=QWenTokenizer, fast_tokenizer_class=QwenVLTokenizer, exist_ok=True
    )
