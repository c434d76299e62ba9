"""Conversation prompts (ChatML for Qwen-VL-Chat, raw for Qwen-VL), stop words and reply decoding (SPEC 7)."""

from __future__ import annotations

from collections.abc import Sequence

from .tokenizer import QwenVLTokenizer

DEFAULT_SYSTEM = "You are a helpful assistant."
CHAT_FORMATS = ("chatml", "raw")
GROUNDING_TAGS = ("<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>")
# A message is text (its <img>/<ref>/<box> tags are live, as in the original) or a list-format
# list of parts whose text is always plain: the safe form for text typed by someone else. A
# {"reply": text} part is a reply given back as history: its grounding tags are the tokens the
# model wrote, but <img> stays text, so a client's history can never name a file.
Content = str | Sequence[dict]
History = Sequence[tuple[Content, Content | None]]


def _check_format(chat_format: str) -> None:
    if chat_format not in CHAT_FORMATS:
        raise ValueError(f"unknown chat_format {chat_format!r}; expected one of {CHAT_FORMATS}")


def encode_content(tokenizer: QwenVLTokenizer, content: Content) -> tuple[str, list[int]]:
    """(text, ids) of one message.

    A list of parts renders like `from_list_format`, but only its `image` parts become image spans
    (their references are the application's, not a user's); `text` parts are encoded with no
    special tokens at all, so typed `<img>` or `<|im_start|>` stays text; `reply` parts keep only
    their ref/box/quad tags as tokens.
    """
    if isinstance(content, str):
        return content, tokenizer.encode_chat(content)
    pieces: list[tuple[str, str]] = []  # (kind, text): "plain", "image" (a reference) or "reply"
    images = 0
    for part in content:
        if "image" in part:
            images += 1
            pieces += [("plain", f"Picture {images}: "), ("image", str(part["image"])), ("plain", "\n")]
        elif "text" in part:
            pieces.append(("plain", part["text"]))
        elif "reply" in part:
            pieces.append(("reply", part["reply"]))
        else:
            raise ValueError(f"a message part needs an 'image', 'text' or 'reply' key, got {sorted(part)}")
    text, ids, plain = "", [], ""
    for kind, piece in [*pieces, ("end", "")]:
        if kind == "plain":  # adjacent plain pieces are encoded together, as one string would be
            plain += piece
            continue
        ids += tokenizer.encode(plain, allowed_special=set()) if plain else []
        text, plain = text + plain, ""
        if kind == "image":
            text += f"<img>{piece}</img>"
            ids += tokenizer.image_span_ids(piece)
        elif kind == "reply":
            text += piece
            ids += tokenizer.encode(piece, allowed_special=set(GROUNDING_TAGS))
    return text, ids


def make_context(
    tokenizer: QwenVLTokenizer,
    query: Content,
    history: History | None = None,
    system: Content = "",
    max_window_size: int = 6144,
    chat_format: str = "chatml",
) -> tuple[str, list[int]]:
    """(raw_text, token_ids) of the prompt, keeping the newest history turns that fit the window.

    Content is encoded with only the image/ref/box/quad tags special, so a user who types
    `<|im_start|>` gets plain text, never a control token.
    """
    _check_format(chat_format)
    if chat_format == "raw":
        return encode_content(tokenizer, query)

    im_start, im_end = "<|im_start|>", "<|im_end|>"
    nl = tokenizer.encode("\n")

    def turn(role: str, content: Content) -> tuple[str, list[int]]:
        text, content_ids = encode_content(tokenizer, content)
        ids = [tokenizer.im_start_id, *tokenizer.encode_chat(role), *nl, *content_ids]
        return f"{im_start}{role}\n{text}{im_end}", ids + [tokenizer.im_end_id]

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


def streamable_prefix(text: str, chat_format: str = "chatml") -> str:
    """The part of a reply still being generated that can be shown without being taken back later.

    Holds back a trailing partial character and, for the raw format, an ending that could grow
    into the "Human:" stop word.
    """
    text = text.rstrip("\ufffd")
    if chat_format == "raw":
        for size in range(min(len("Human:"), len(text)), 0, -1):
            if "Human:".startswith(text[-size:]):
                return text[:-size].rstrip()
    return text
