"""Conversation prompts (ChatML for Qwen-VL-Chat, raw for Qwen-VL), stop words and reply decoding (SPEC 7)."""

from __future__ import annotations

from collections.abc import Sequence

from .tokenizer import QwenVLTokenizer

DEFAULT_SYSTEM = "You are a helpful assistant."
CHAT_FORMATS = ("chatml", "raw")
History = Sequence[tuple[str, str | None]]


def _check_format(chat_format: str) -> None:
    if chat_format not in CHAT_FORMATS:
        raise ValueError(f"unknown chat_format {chat_format!r}; expected one of {CHAT_FORMATS}")


def make_context(
    tokenizer: QwenVLTokenizer,
    query: str,
    history: History | None = None,
    system: str = "",
    max_window_size: int = 6144,
    chat_format: str = "chatml",
) -> tuple[str, list[int]]:
    """(raw_text, token_ids) of the prompt, keeping the newest history turns that fit the window.

    Content is encoded with only the image/ref/box/quad tags special, so a user who types
    `<|im_start|>` gets plain text, never a control token.
    """
    _check_format(chat_format)
    if chat_format == "raw":
        return query, tokenizer.encode_chat(query)

    im_start, im_end = "<|im_start|>", "<|im_end|>"
    nl = tokenizer.encode("\n")

    def turn(role: str, content: str) -> tuple[str, list[int]]:
        ids = [tokenizer.im_start_id, *tokenizer.encode_chat(role), *nl, *tokenizer.encode_chat(content)]
        return f"{im_start}{role}\n{content}{im_end}", ids + [tokenizer.im_end_id]

    system_text, system_ids = turn("system", system)
    kept_text, kept_ids = "", []
    for turn_query, turn_response in reversed(list(history or [])):
        query_text, query_ids = turn("user", turn_query)
        if turn_response is not None:
            response_text, response_ids = turn("assistant", turn_response)
            ids = nl + query_ids + nl + response_ids
            text = f"\n{query_text}\n{response_text}"
        else:
            ids, text = nl + query_ids + nl, f"\n{query_text}\n"
        if len(system_ids) + len(ids) + len(kept_ids) >= max_window_size:
            break
        kept_text, kept_ids = text + kept_text, ids + kept_ids

    query_text, query_ids = turn("user", query)
    raw_text = f"{system_text}{kept_text}\n{query_text}\n{im_start}assistant\n"
    ids = (
        system_ids
        + kept_ids
        + nl
        + query_ids
        + nl
        + [tokenizer.im_start_id, *tokenizer.encode("assistant"), *nl]
    )
    return raw_text, ids


def get_stop_words_ids(chat_format: str, tokenizer: QwenVLTokenizer) -> list[list[int]]:
    """Id sequences that end a reply: `<|im_end|>`/`<|im_start|>` for ChatML, "Human:"/`<|endoftext|>` raw."""
    _check_format(chat_format)
    if chat_format == "chatml":
        return [[tokenizer.im_end_id], [tokenizer.im_start_id]]
    return [tokenizer.encode("Human:"), [tokenizer.eod_id]]


def decode_reply(
    tokenizer: QwenVLTokenizer, generated_ids: Sequence[int], chat_format: str = "chatml"
) -> str:
    """The reply text of generated ids (prompt excluded): cut at the first stop, stripped.

    Unlike the original, a reply cut by max_new_tokens keeps its last token.
    """
    _check_format(chat_format)
    ids = list(generated_ids)
    ends = {tokenizer.im_start_id, tokenizer.im_end_id, tokenizer.eod_id}
    cut = next((i for i, t in enumerate(ids) if t in ends), len(ids))
    text = tokenizer.decode(ids[:cut])
    if chat_format == "raw" and "Human:" in text:
        text = text[: text.index("Human:")]
    return text.strip()
