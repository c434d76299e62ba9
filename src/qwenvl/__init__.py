"""Qwen-VL and Qwen-VL-Chat on modern PyTorch and transformers, without remote code."""

from .chat_format import decode_reply, get_stop_words_ids, make_context
from .config import QwenVLConfig
from .modeling import QwenVLForCausalLM
from .prefix_cache import PrefixCache
from .tokenizer import QWenTokenizer, QwenVLTokenizer
from .transformers_registration import register
from .version import package_version

register()

__version__ = package_version()

__all__ = [
    "DEMO_MODEL",
    "PrefixCache",
    "QWenTokenizer",
    "QwenVLConfig",
    "QwenVLForCausalLM",
    "QwenVLTokenizer",
    "decode_reply",
    "get_stop_words_ids",
    "make_context",
]


def __getattr__(name: str):
    # `qwenvl.DEMO_MODEL` without importing the recipe module at package import (it is runnable
    # with python -m, which warns when the package has already imported it)
    if name == "DEMO_MODEL":
        from .demo_model import DEMO_MODEL

        return DEMO_MODEL
    raise AttributeError(f"module 'qwenvl' has no attribute {name!r}")
