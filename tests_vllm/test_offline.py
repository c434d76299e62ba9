"""`vllm.LLM` on a Qwen-VL folder, no trust_remote_code: `LLM.chat` replies as qwenvl's `model.chat`."""

from __future__ import annotations

import pytest

from cases import CASES, NEW_TOKENS, SHAPES, blank_spans, openai_messages, vllm_engine_options

pytest.importorskip(
    "vllm", reason="the vLLM plugin's tests need vLLM: `make venv-vllm` builds its environment"
)


@pytest.fixture(scope="module")
def llm(checkpoint):
    from vllm import LLM

    engine = LLM(model=str(checkpoint), **vllm_engine_options())
    yield engine
    engine.llm_engine.engine_core.shutdown()


def greedy():
    from vllm import SamplingParams

    return SamplingParams(temperature=0, max_tokens=NEW_TOKENS)


def test_chat_replies_are_model_chat_replies(llm, references, tokenizer):
    """Every case in one batch: prompts of different NTK alphas prefill and decode side by side."""
    from qwenvl.chat_format import decode_reply

    outputs = llm.chat([openai_messages(case) for case in CASES.values()], greedy())
    for (name, reference), output in zip(references.items(), outputs, strict=True):
        tokens = list(output.outputs[0].token_ids)
        assert blank_spans(output.prompt_token_ids) == blank_spans(reference["prompt"]), name
        assert tokens == reference["tokens"], name
        assert decode_reply(tokenizer, tokens) == reference["response"], name


def test_a_text_prompt_names_its_pictures_with_empty_spans(llm, references):
    question = CASES["one_image"][2][1]["text"]
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = llm.get_tokenizer().apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert "Picture 1: <img></img>\n" in text
    prompt = {"prompt": text, "multi_modal_data": {"image": _picture(SHAPES)}}
    output = llm.generate(prompt, greedy())[0]
    assert list(output.outputs[0].token_ids) == references["one_image"]["tokens"]


def test_spans_and_pictures_must_pair_up(llm):
    picture = _picture(SHAPES)
    prompt = {"prompt": "Picture 1: <img></img>\nAnd?", "multi_modal_data": {"image": [picture, picture]}}
    with pytest.raises(ValueError, match="1 image spans for 2 pictures"):
        llm.generate(prompt, greedy())


def test_prompts_past_seq_length_turn_prefix_caching_off(llm):
    assert llm.llm_engine.vllm_config.cache_config.enable_prefix_caching is False


def test_the_tokenizer_is_qwenvls_without_remote_code(llm):
    from qwenvl.vllm_plugin.tokenizer import QwenVLTokenizerForVllm

    tokenizer = llm.get_tokenizer()
    assert isinstance(tokenizer, QwenVLTokenizerForVllm)
    assert tokenizer.eos_token_id == tokenizer.im_end_id


def _picture(url: str):
    import base64
    import io

    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")
