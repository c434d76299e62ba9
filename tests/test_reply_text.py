"""ReplyText: a streamed reply's text is only ever extended, and ends where decode_reply ends it."""

from __future__ import annotations

import pytest

from qwenvl.chat_format import ReplyText, decode_reply


def feed(reply: ReplyText, ids: list[int]) -> str:
    """The text shown while `ids` arrive one at a time."""
    return "".join(reply.add(token) for token in ids)


def byte_ids(tokenizer, text: str) -> list[int]:
    """`text` as one token per UTF-8 byte, so that characters arrive in pieces."""
    return [tokenizer.mergeable_ranks[bytes([b])] for b in text.encode("utf-8")]


def test_a_partial_character_is_held_back(tokenizer):
    reply = ReplyText(tokenizer)
    assert feed(reply, tokenizer.encode("A ")) == "A"  # the space waits for what follows
    assert [reply.add(t) for t in byte_ids(tokenizer, "猫")] == ["", "", " 猫"]
    assert reply.add(byte_ids(tokenizer, "狗")[0]) == ""
    assert reply.finish() == "\ufffd"  # cut by max_new_tokens mid-character: as decode_reply has it
    assert reply.text == "A 猫\ufffd" == decode_reply(tokenizer, reply.tokens)


def test_a_stop_string_across_tokens_cuts_the_reply(tokenizer):
    reply = ReplyText(tokenizer, stops=["lo wo"])
    assert feed(reply, tokenizer.encode("Hello")) == "Hel"  # "lo" may begin the stop string
    assert feed(reply, tokenizer.encode(" world")) == ""
    assert reply.stopped and reply.text == "Hel"
    assert feed(reply, tokenizer.encode(" and more")) == "" and reply.finish() == ""
    assert len(reply.tokens) == len(tokenizer.encode("Hello world and more"))  # every token counts


def test_a_stop_string_is_cut_exactly(tokenizer):
    reply = ReplyText(tokenizer, stops=["", "world"])  # an empty stop string is ignored
    assert feed(reply, tokenizer.encode("Hello world")) == "Hello "
    assert reply.stopped


def test_a_held_back_start_of_a_stop_string_is_released(tokenizer):
    reply = ReplyText(tokenizer, stops=["lo wo"])
    assert feed(reply, tokenizer.encode("Hello")) == "Hel"
    assert feed(reply, tokenizer.encode(" friend")) == "lo friend"
    assert not reply.stopped and reply.finish() == ""


def test_raw_format_stops_at_human(tokenizer):
    reply = ReplyText(tokenizer, "raw")
    assert feed(reply, tokenizer.encode("A cat.\n")) == "A cat."
    assert feed(reply, tokenizer.encode("Hum")) == ""  # may grow into "Human:"
    assert feed(reply, tokenizer.encode("an: more")) == ""
    assert reply.stopped and reply.text == "A cat."  # the line break before "Human:" is cut too
    assert reply.finish() == ""


def test_raw_format_releases_what_is_not_human(tokenizer):
    reply = ReplyText(tokenizer, "raw")
    assert feed(reply, tokenizer.encode("A cat.\nHum")) == "A cat."
    assert feed(reply, tokenizer.encode("ble.")) == "\nHumble."
    chatml = ReplyText(tokenizer)  # only the raw format has the stop word
    assert feed(chatml, tokenizer.encode("A cat.\nHum")) == "A cat.\nHum"


def test_finish_releases_what_was_held_back(tokenizer):
    reply = ReplyText(tokenizer, "raw", stops=["STOP"])
    assert feed(reply, tokenizer.encode("A cat. S")) == "A cat."
    assert reply.finish() == " S"
    assert reply.finish() == "" and reply.text == "A cat. S"


def test_an_end_token_ends_the_reply_at_once(tokenizer):
    reply = ReplyText(tokenizer, "raw")
    assert feed(reply, tokenizer.encode("A cat. Hu")) == "A cat."
    assert reply.add(tokenizer.eod_id) == " Hu"  # no more tokens can make it "Human:"
    assert feed(reply, tokenizer.encode(" more")) == "" and reply.finish() == ""
    assert not reply.stopped and reply.text == "A cat. Hu"


@pytest.mark.parametrize(
    ("text", "chat_format", "stops"),
    [
        (" <ref>猫</ref><box>(1,2),(3,4)</box> 🐈 and more", "chatml", []),
        ("A cat.  \nHuman: and a dog", "raw", []),
        ("Nothing to stop here, 你好世界", "raw", ["好世界!"]),
        ("one, two; three", "chatml", [";", "two"]),
    ],
)
def test_the_shown_text_only_grows_into_the_whole_reply(tokenizer, text, chat_format, stops):
    ids = byte_ids(tokenizer, text[:12]) + tokenizer.encode(text[12:]) + [tokenizer.im_end_id]
    reply = ReplyText(tokenizer, chat_format, stops)
    shown = []
    for token in ids:
        reply.add(token)
        shown.append(reply.text)
    reply.finish()
    assert all(later.startswith(earlier) for earlier, later in zip(shown, shown[1:], strict=False))
    whole = decode_reply(tokenizer, ids, chat_format)
    cuts = [whole.index(s) for s in stops if s in whole]
    assert reply.text == (whole[: min(cuts)] if cuts else whole)
    assert "\ufffd" not in "".join(shown)


def test_an_unknown_chat_format_is_named(tokenizer):
    with pytest.raises(ValueError, match="'vicuna'"):
        ReplyText(tokenizer, "vicuna")
