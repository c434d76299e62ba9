"""Qwen-VL and Qwen-VL-Chat on modern PyTorch and transformers, without remote code."""

from .chat_format import decode_reply, get_stop_words_ids, make_context
from .config import QwenVLConfig
from .demo_model import DEMO_MODEL
from .model import QwenVLForCausalLM
from .tokenizer import QWenTokenizer, QwenVLTokenizer
from .transformers_registration import register

register()

__all__ = [
    "DEMO_MODEL",
    "QWenTokenizer",
    "QwenVLConfig",
    "QwenVLForCausalLM",
    "QwenVLTokenizer",
    "decode_reply",
    "get_stop_words_ids",
    "make_context",
]
