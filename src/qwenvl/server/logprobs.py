"""Log-probabilities in OpenAI's shapes: chat's `logprobs.content` and the legacy completions'
`tokens`, `token_logprobs`, `top_logprobs` and `text_offset`.

The engine computes them where it chooses each token (`decode.sequence.choose_next`): the model's
own distribution, before temperature, top-k, top-p or a repetition penalty. A token is shown as
its piece of text, the tokenizer's bytes for it decoded as UTF-8; a piece that holds only part of
a character shows those bytes as `\\xNN` escapes (chat's `bytes` field holds them exactly). An id
past the tokenizer's vocabulary (the model's is padded) has no text: "" and no bytes.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence

from ..decode.sequence import TokenLogprobs
from ..tokenizer import QwenVLTokenizer

# OpenAI's floor for a token the model gives no chance at all; JSON has no -Infinity
LOWEST_LOGPROB = -9999.0


def token_bytes(tokenizer: QwenVLTokenizer, token: int) -> bytes:
    try:
        piece = tokenizer.convert_ids_to_tokens(token)
    except KeyError:  # an id of the model's padded vocabulary
        return b""
    return piece.encode("utf-8") if isinstance(piece, str) else piece


def token_text(data: bytes) -> str:
    return data.decode("utf-8", errors="backslashreplace")


def _logprob(value: float) -> float:
    return max(value, LOWEST_LOGPROB)


def chat_logprobs(tokenizer: QwenVLTokenizer, entries: Sequence[TokenLogprobs]) -> dict:
    """Chat's `choices[].logprobs` of these tokens."""

    def item(token: int, logprob: float) -> dict:
        data = token_bytes(tokenizer, token)
        return {"token": token_text(data), "logprob": _logprob(logprob), "bytes": list(data)}

    content = [
        {**item(entry.token, entry.logprob), "top_logprobs": [item(t, value) for t, value in entry.top]}
        for entry in entries
    ]
    return {"content": content}


class LegacyLogprobs:
    """The legacy completions' `logprobs` of a completion's tokens, shaped as they come, in one
    piece or in a stream's: `text_offset` is where each token's text starts in the completion's
    text (tokens that share a character all start where it starts)."""

    def __init__(self, tokenizer: QwenVLTokenizer):
        self.tokenizer = tokenizer
        self._text = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._length = 0  # characters of the text before the next token

    def shape(self, entries: Sequence[TokenLogprobs]) -> dict:
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for entry in entries:
            data = token_bytes(self.tokenizer, entry.token)
            top: dict[str, float] = {}
            for token, value in entry.top:  # pieces alike (padded ids) keep the likeliest's
                top.setdefault(token_text(token_bytes(self.tokenizer, token)), _logprob(value))
            out["tokens"].append(token_text(data))
            out["token_logprobs"].append(_logprob(entry.logprob))
            out["top_logprobs"].append(top)
            out["text_offset"].append(self._length)
            self._length += len(self._text.decode(data))
        return out
