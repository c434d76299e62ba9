"""Conversations whose images are already loaded: prompt ids plus the images they reference.

Front ends (server, web demo, CLI) load images themselves under their own policy, then build the
prompt here. Each image gets a placeholder reference in its span, a digest of the picture (the
span's content is replaced by the image's features, so the name never reaches the model, but it
tells pictures apart for prefix reuse). Text a client sends (its messages, the replies it gives
back as history, its system message) can never open a file or become a control token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .chat_format import DEFAULT_CHAT_FORMAT, DEFAULT_MAX_WINDOW_SIZE, DEFAULT_SYSTEM, make_context
from .in_memory_images import image_name
from .tokenizer import QwenVLTokenizer


@dataclass
class Message:
    """One user message: its parts in order, each a text (str) or an image (a PIL image)."""

    parts: list = field(default_factory=list)

    @property
    def images(self) -> list:
        return [p for p in self.parts if not isinstance(p, str)]


@dataclass
class Prompt:
    ids: list[int]
    images: list  # PIL images, one per image span of `ids`, in order
    text: str


def build_prompt(
    tokenizer: QwenVLTokenizer,
    query: Message,
    history: Sequence[tuple[Message, str]] = (),
    system: str = DEFAULT_SYSTEM,
    max_window_size: int = DEFAULT_MAX_WINDOW_SIZE,
    chat_format: str = DEFAULT_CHAT_FORMAT,
) -> Prompt:
    """The prompt for `query` after `history`; old turns that do not fit the window are dropped
    (with their images)."""
    named: dict[str, object] = {}

    def content(message: Message) -> list[dict]:
        parts = []
        for part in message.parts:
            if isinstance(part, str):
                parts.append({"text": part})
            else:
                name = image_name(part)
                named[name] = part
                parts.append({"image": name})
        return parts

    # a client sends the system message and the replies too: their <img> tags stay text
    turns = [(content(m), [{"reply": reply}]) for m, reply in history]
    system_content = [{"text": system}]
    text, ids = make_context(tokenizer, content(query), turns, system_content, max_window_size, chat_format)
    return Prompt(ids, [named[name] for name in tokenizer.image_references(ids)], text)
