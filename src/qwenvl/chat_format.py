"""Conversation prompts (ChatML for Qwen-VL-Chat, raw for Qwen-VL), stop words and reply decoding (SPEC 7)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from .tokenizer import QwenVLTokenizer

logger = logging.getLogger(__name__)

DEFAULT_SYSTEM = "You are a helpful assistant."
CHAT_FORMATS = ("chatml", "raw")
DEFAULT_CHAT_FORMAT = "chatml"
DEFAULT_MAX_WINDOW_SIZE = 6144  # tokens of history a prompt keeps (older turns are dropped)
# Qwen-VL-Chat's generation_config.json, for checkpoints that lack one.
CHAT_GENERATION_DEFAULTS = dict(
    chat_format=DEFAULT_CHAT_FORMAT,
    do_sample=True,
    top_p=0.3,
    top_k=0,
    max_new_tokens=512,
    max_window_size=DEFAULT_MAX_WINDOW_SIZE,
    eos_token_id=151643,
    pad_token_id=151643,
)
RAW_STOP_WORD = "Human:"  # a raw-format reply ends where the model starts the next turn
GROUNDING_TAGS = ("<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>")
# A message is text (its <img>/<ref>/<box> tags are live, as in the original) or a list-format
# list of parts whose text is always plain: the safe form for text typed by someone else. A
# {"reply": text} part is a reply given back as history: its grounding tags are the tokens the
# model wrote, but <img> stays text, so a client's history can never name a file.
Content = str | Sequence[dict]
History = Sequence[tuple[Content, Content | None]]


def prompt_settings(
    generation_config: Any, chat_format: str | None = None, max_window_size: int | None = None
) -> tuple[str, int]:
    """(chat format, max window size): those given, else the generation config's, else the defaults."""
    chat_format = chat_format or getattr(generation_config, "chat_format", None) or DEFAULT_CHAT_FORMAT
    _check_format(chat_format)
    window = max_window_size or getattr(generation_config, "max_window_size", None) or DEFAULT_MAX_WINDOW_SIZE
    return chat_format, window


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
    max_window_size: int = DEFAULT_MAX_WINDOW_SIZE,
    chat_format: str = DEFAULT_CHAT_FORMAT,
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
    return [tokenizer.encode(RAW_STOP_WORD), [tokenizer.eod_id]]


def decode_reply(
    tokenizer: QwenVLTokenizer, generated_ids: Sequence[int], chat_format: str = DEFAULT_CHAT_FORMAT
) -> str:
    """The reply text of generated ids (prompt excluded), as `ReplyText` ends it: cut at the first
    end token (and, raw, at "Human:"), stripped.

    Unlike the original, a reply cut by max_new_tokens keeps its last token.
    """
    reply = ReplyText(tokenizer, chat_format)
    reply.tokens.extend(generated_ids)
    return reply.finish()


class ReplyText:
    """A reply decoded as its tokens arrive, as text that can be shown and is never taken back.

    `add(token)` returns the new text that can be shown, `finish()` the rest; `text` is all of it
    so far. The whole reply is decoded each time. Held back until later tokens settle them: a
    trailing partial UTF-8 character (U+FFFD) and an ending that may grow into a stop string.
    The reply ends at the first end token or stop string and is stripped; the stop strings are
    the client's `stops`, cut exactly, and for the raw format "Human:" (where the model starts
    the next turn), cut with the spaces before it. `strip=False` keeps the spaces at both ends
    (a completion's text, which continues its prompt's).
    """

    def __init__(
        self,
        tokenizer: QwenVLTokenizer,
        chat_format: str = DEFAULT_CHAT_FORMAT,
        stops: Sequence[str] = (),
        strip: bool = True,
    ):
        _check_format(chat_format)
        self.tokenizer = tokenizer
        self.raw = chat_format == "raw"
        self.strip = strip
        self.stops = [s for s in stops if s]
        self.ends = {tokenizer.im_start_id, tokenizer.im_end_id, tokenizer.eod_id}
        self.tokens: list[int] = []  # every token fed, those after the reply's end too
        self.text = ""
        self.stopped = False  # a stop string was found
        self.done = False  # nothing more will be shown

    def add(self, token: int) -> str:
        self.tokens.append(token)
        return self._advance(final=False)

    def finish(self) -> str:
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self.done:
            return ""
        end = next((i for i, t in enumerate(self.tokens) if t in self.ends), None)
        text = self.tokenizer.decode(self.tokens[:end])
        if self.raw and RAW_STOP_WORD in text:
            text, self.stopped = text[: text.index(RAW_STOP_WORD)], True
        if self.strip:
            text = text.strip()
        found = [text.index(s) for s in self.stops if s in text]
        if found:
            text, self.stopped = text[: min(found)], True
        self.done = final or self.stopped or end is not None
        if not self.done:  # later tokens may still complete a character or a stop string
            text = text.rstrip("\ufffd")
            held = _stop_prefix_length(text, [*self.stops, RAW_STOP_WORD] if self.raw else self.stops)
            text = text[: len(text) - held]
            if self.strip:  # trailing spaces wait for what follows: a reply that ends there is stripped
                text = text.rstrip()
        if not text.startswith(self.text):  # only a malformed <img> span decodes differently later
            logger.warning("reply text changed while streaming; the change is not shown")
            return ""
        delta, self.text = text[len(self.text) :], text
        return delta


def _stop_prefix_length(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that begins some stop string."""
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
