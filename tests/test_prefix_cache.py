"""A conversation's prefix cache: later turns run only their new tokens and reply as without it."""

from __future__ import annotations

import pytest

from qwenvl import PrefixCache, make_context
from qwenvl.chat_format import DEFAULT_SYSTEM

pytestmark = pytest.mark.usefixtures("in_golden_dir")
FIRST = "Picture 1: <img>images/shapes.png</img>\n描述画面内容。"
LATER = ["框出图中的真人", "What colour is it?"]
GREEDY = {"do_sample": False, "max_new_tokens": 8}


@pytest.fixture
def counted(tiny_model, monkeypatch):
    """Images encoded and prompt tokens restored from the prefix cache, per call."""
    calls = {"encoded": [], "restored": []}
    encode, restore = tiny_model.encode_images, PrefixCache.restore

    def encode_images(references, *args, **kwargs):
        calls["encoded"].append(len(references))
        return encode(references, *args, **kwargs)

    def restored(self, model, prompt, cache):
        calls["restored"].append(restore(self, model, prompt, cache))
        return calls["restored"][-1]

    monkeypatch.setattr(tiny_model, "encode_images", encode_images)
    monkeypatch.setattr(PrefixCache, "restore", restored)
    return calls


def conversation(model, tokenizer, **options) -> list[str]:
    history = None
    for query in [FIRST, *LATER]:
        _, history = model.chat(tokenizer, query, history=history, **GREEDY, **options)
    return [reply for _, reply in history]


def test_later_turns_reuse_the_image_and_the_history(tiny_model, tokenizer, counted):
    plain = conversation(tiny_model, tokenizer)
    assert counted["encoded"] == [1, 1, 1]  # every turn encodes the picture again
    counted["encoded"].clear()
    cache = PrefixCache()
    assert conversation(tiny_model, tokenizer, prefix_cache=cache) == plain
    assert counted["encoded"] == [1]  # only the first turn
    first, *later = counted["restored"]
    assert first == 0 and all(n > 258 for n in later)  # past the image span: the history is reused
    assert len(cache) == 1


def test_chat_stream_with_a_prefix_cache_streams_the_same_reply(tiny_model, tokenizer):
    cache = PrefixCache()
    _, history = tiny_model.chat(tokenizer, FIRST, **GREEDY, prefix_cache=cache)
    expected, _ = tiny_model.chat(tokenizer, LATER[0], history=history, **GREEDY)
    *_, streamed = tiny_model.chat_stream(tokenizer, LATER[0], history=history, **GREEDY, prefix_cache=cache)
    assert streamed == expected


def test_another_conversation_shares_only_what_is_the_same(tiny_model, tokenizer, counted):
    cache = PrefixCache()
    tiny_model.chat(tokenizer, FIRST, **GREEDY, prefix_cache=cache)
    other = "Picture 1: <img>images/texture.png</img>\nHow many shapes?"
    reply, _ = tiny_model.chat(tokenizer, other, **GREEDY, prefix_cache=cache)
    assert reply == tiny_model.chat(tokenizer, other, **GREEDY)[0]
    # the system message and the words before the picture, whose span names another file
    _, ids = make_context(tokenizer, other, system=DEFAULT_SYSTEM)
    assert 0 < counted["restored"][-1] <= ids.index(tokenizer.img_start_id)


def test_an_unfinished_stream_leaves_the_cache_alone(tiny_model, tokenizer):
    cache = PrefixCache()
    stream = tiny_model.chat_stream(tokenizer, FIRST, **GREEDY, prefix_cache=cache)
    next(stream)
    stream.close()
    assert len(cache) == 0
    cache = PrefixCache(max_entries=0)
    tiny_model.chat(tokenizer, FIRST, **GREEDY, prefix_cache=cache)
    assert len(cache) == 0


def test_a_cache_kept_for_another_dtype_is_not_reused(tiny_checkpoint, tiny_model, tokenizer, counted):
    from qwenvl import QwenVLForCausalLM

    half = QwenVLForCausalLM.from_pretrained(tiny_checkpoint, bf16=True)
    cache = PrefixCache()
    _, history = tiny_model.chat(tokenizer, FIRST, **GREEDY, prefix_cache=cache)
    reply, _ = half.chat(tokenizer, LATER[0], history=history, **GREEDY, prefix_cache=cache)
    assert counted["restored"][-1] == 0
    assert reply == half.chat(tokenizer, LATER[0], history=history, **GREEDY)[0]
