"""Make transformers' Auto classes return qwenvl's classes for Qwen-VL folders, without remote code."""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .config import MODEL_TYPE, QwenVLConfig
from .modeling import QwenVLForCausalLM
from .tokenizer import QWenTokenizer, QwenVLTokenizer


def register() -> None:
    """Idempotent: safe to call again after another library registered "qwen"."""
    AutoConfig.register(MODEL_TYPE, QwenVLConfig, exist_ok=True)
    AutoModelForCausalLM.register(QwenVLConfig, QwenVLForCausalLM, exist_ok=True)
    # Official folders name "QWenTokenizer"; aliasing it to our class makes AutoTokenizer pick it.
    AutoTokenizer.register(
        QwenVLConfig, slow_tokenizer_class=QWenTokenizer, fast_tokenizer_class=QwenVLTokenizer, exist_ok=True
    )
