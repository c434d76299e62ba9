"""Qwen-VL-Chat's ChatML prompt from vLLM's parsed messages (SPEC 7), built as `make_context` builds it.

vLLM parses OpenAI messages into a conversation whose contents are lists of parts: `{"type":
"text", "text": ...}` and `{"type": "image"}` for each picture (its pixels travel apart). Each turn
is encoded as qwenvl's `encode_content` encodes list-format content: a picture becomes `Picture N:
` plus its image span and a newline, numbered from 1 in each message; typed text is plain text,
so `<|im_start|>` or `<img>` in a message never becomes a token; a reply's grounding tags
(`<ref>`, `<box>`) are the model's own tokens. A content given as one string (vLLM's "string"
content format) is text the same way: a client's message never opens a picture or a turn.

`CHAT_TEMPLATE` renders the same text in Jinja, for vLLM's template machinery and for readers: its
loop over a message's parts is what makes vLLM pass the parts rather than one flattened string.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..chat_format import DEFAULT_SYSTEM, encode_content
from ..tokenizer import IMEND, IMSTART, QwenVLTokenizer

ROLES = ("system", "user", "assistant")

CHAT_TEMPLATE = (
    "{%- if not messages or messages[0]['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM + "<|im_end|>' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if not loop.first or message['role'] != 'system' -%}{{- '\\n' -}}{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- set pictures = namespace(count=0) -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{%- set pictures.count = pictures.count + 1 -%}"
    "{{- 'Picture ' + pictures.count|string + ': <img></img>\\n' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- if not (loop.last and continue_final_message) -%}{{- '<|im_end|>' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt and not continue_final_message -%}"
    "{{- '\\n<|im_start|>assistant\\n' -}}{%- endif -%}"
)


class ChatFormatError(ValueError):
    """A message that Qwen-VL-Chat's prompt format cannot hold."""


def _parts(role: str, content: Any) -> list[dict]:
    """qwenvl list-format parts of one message's content."""
    if content is None:
        return []
    if isinstance(content, str):
        content = [{"type": "text", "text": content}]
    parts: list[dict] = []
    for part in content:
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text":
            parts.append({"reply" if role == "assistant" else "text": part.get("text") or ""})
        elif kind == "image" and role != "assistant":
            parts.append({"image": ""})
        else:
            raise ChatFormatError(
                f"a Qwen-VL-Chat {role} message holds text and images only, not {kind!r} parts"
            )
    return parts


def conversation_prompt(
    tokenizer: QwenVLTokenizer,
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
) -> tuple[str, list[int]]:
    """(text, ids) of the ChatML prompt for vLLM's conversation; the default system message
    when the conversation opens without one, as `model.chat` adds it."""
    nl = tokenizer.encode("\n")
    turns = list(messages)
    if not turns or turns[0].get("role") != "system":
        turns.insert(0, {"role": "system", "content": [{"type": "text", "text": DEFAULT_SYSTEM}]})
    text, ids = "", []
    for index, message in enumerate(turns):
        role = message.get("role")
        if role not in ROLES:
            raise ChatFormatError(f"Qwen-VL-Chat knows the roles {', '.join(ROLES)}, not {role!r}")
        if message.get("tool_calls"):
            raise ChatFormatError("Qwen-VL-Chat has no tool calls")
        content_text, content_ids = encode_content(tokenizer, _parts(role, message.get("content")))
        open_ended = continue_final_message and index == len(turns) - 1
        if index:
            text, ids = text + "\n", ids + nl
        text += f"{IMSTART}{role}\n{content_text}" + ("" if open_ended else IMEND)
        ids += [tokenizer.im_start_id, *tokenizer.encode_chat(role), *nl, *content_ids]
        ids += [] if open_ended else [tokenizer.im_end_id]
    if add_generation_prompt and not continue_final_message:
        text += f"\n{IMSTART}assistant\n"
        ids += [*nl, tokenizer.im_start_id, *tokenizer.encode("assistant"), *nl]
    return text, ids
