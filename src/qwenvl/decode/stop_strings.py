"""Stop strings: text that ends a sequence once its generated tokens spell it.

They are found in the tokens' bytes, not in decoded text: a string may begin or end inside a
token (as with transformers' StopStringCriteria), and a character split across tokens counts
once its last byte arrives. UTF-8 is self-synchronizing, so a string's bytes occur in the
bytes of a text exactly where the string occurs in the text.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any


class StopStrings:
    """A request's stop strings and the bytes of its tokenizer's tokens."""

    def __init__(self, strings: str | Iterable[str], tokenizer: Any):
        strings = [strings] if isinstance(strings, str) else list(strings)
        if not strings or not all(isinstance(s, str) and s for s in strings):
            raise ValueError(f"stop_strings must be a non-empty string or list of them, got {strings!r}")
        self.strings = tuple(strings)
        self._patterns = tuple(s.encode("utf-8") for s in self.strings)
        self._kept = max(len(p) for p in self._patterns) - 1  # bytes a later match may start in
        self._token_bytes = token_bytes_of(tokenizer)

    def __repr__(self) -> str:
        return f"StopStrings({list(self.strings)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StopStrings) and other.strings == self.strings

    def __hash__(self) -> int:
        return hash(self.strings)

    def scan(self, tail: bytes, token: int) -> tuple[bytes, bool]:
        """(the tail to keep for the next token, whether a string ends in `token`'s bytes), given
        the `tail` kept after the tokens before it."""
        new = self._token_bytes(token)
        if not new:
            return tail, False
        window = tail + new
        # a match must end in the new bytes: one wholly in the tail was found before
        found = any(window.find(p, max(0, len(tail) - len(p) + 1)) >= 0 for p in self._patterns)
        return (window[max(0, len(window) - self._kept) :] if self._kept else b""), found


def token_bytes_of(tokenizer: Any) -> Callable[[int], bytes]:
    """The bytes of one token id: the tokenizer's own bytes where it has them (tiktoken
    vocabularies, such as Qwen-VL's), else the UTF-8 of its decoded text. Special tokens give their
    surface text, as `decode` does; ids past the tokenizer's vocabulary (the model's padding) none."""
    if not callable(getattr(tokenizer, "decode", None)):
        raise ValueError(f"stop_strings need a tokenizer with decode(), got {type(tokenizer).__name__}")
    size = len(tokenizer) if hasattr(tokenizer, "__len__") else None
    known: dict[int, bytes] = {}

    def token_bytes(token: int) -> bytes:
        if token not in known:
            if size is not None and token >= size:
                known[token] = b""
            else:
                piece = (
                    tokenizer.convert_ids_to_tokens(token)
                    if hasattr(tokenizer, "convert_ids_to_tokens")
                    else None
                )
                known[token] = (
                    piece if isinstance(piece, bytes) else tokenizer.decode([token]).encode("utf-8")
                )
        return known[token]

    return token_bytes
