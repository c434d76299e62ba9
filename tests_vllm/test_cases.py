"""The chat cases can tell a right rotation from a wrong one (qwenvl alone, no vLLM engine)."""

from __future__ import annotations

import pytest

from cases import CASES, chat_reference

PAST_SEQ_LENGTH = ["long_text", "one_image", "two_images", "history"]


def replies_without(checkpoint, tokenizer, switch: str) -> dict:
    from qwenvl import QwenVLConfig, QwenVLForCausalLM

    config = QwenVLConfig.from_pretrained(checkpoint)
    setattr(config, switch, False)
    model = QwenVLForCausalLM.from_pretrained(checkpoint, config=config, fp32=True)
    return {name: chat_reference(model, tokenizer, case)["tokens"] for name, case in CASES.items()}


def test_the_cases_depend_on_ntk_and_logn(checkpoint, tokenizer, references):
    without_ntk = replies_without(checkpoint, tokenizer, "use_dynamic_ntk")
    without_logn = replies_without(checkpoint, tokenizer, "use_logn_attn")
    for name in PAST_SEQ_LENGTH:
        assert without_ntk[name] != references[name]["tokens"], name
        assert without_logn[name] != references[name]["tokens"], name
    # the short prompt is prefilled below seq_length (alpha 1) and decoded past it (log-n)
    assert without_ntk["text"] == references["text"]["tokens"]
    assert without_logn["text"] != references["text"]["tokens"]


@pytest.mark.parametrize("name", list(CASES))
def test_the_references_run_their_whole_length(references, name):
    from cases import NEW_TOKENS

    assert len(references[name]["tokens"]) == NEW_TOKENS
