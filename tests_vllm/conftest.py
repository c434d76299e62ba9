"""Fixtures of the vLLM plugin's tests: the checkpoint, built once, and qwenvl's own greedy
`model.chat` replies to the cases (`cases.py`).

Run with the vLLM environment's pytest (`make test` does: `.venv-vllm/bin/python -m pytest
tests_vllm`); the main suite never collects this folder. vLLM runs a model in processes of its
own, so the tests compare tokens, not tensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cases import CASES, GOLDEN_CONFIG, build_sharp_checkpoint, chat_reference, short_prompt_length


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    config = json.loads(GOLDEN_CONFIG.read_text())
    config["seq_length"] = short_prompt_length() + 4
    return build_sharp_checkpoint(tmp_path_factory.mktemp("vllm") / "qwen-vl-chat", config)


@pytest.fixture(scope="session")
def tokenizer(checkpoint):
    from qwenvl import QwenVLTokenizer

    return QwenVLTokenizer.from_pretrained(checkpoint)


@pytest.fixture(scope="session")
def reference_model(checkpoint):
    from qwenvl import QwenVLForCausalLM

    return QwenVLForCausalLM.from_pretrained(checkpoint, fp32=True)


@pytest.fixture(scope="session")
def references(reference_model, tokenizer) -> dict:
    return {name: chat_reference(reference_model, tokenizer, case) for name, case in CASES.items()}
