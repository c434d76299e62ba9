"""Keys and values of finished sequences, kept for prompts that start the same way.

The next turn of a conversation starts with the previous turn's prompt and reply: its keys and
values are copied from here, and only the new tokens run through the model (the images and the
history are not encoded again). The serving engine keeps several sequences; a caller of
`model.chat` keeps one conversation's (`PrefixCache()`, passed as `prefix_cache=`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .cache import KVCache
from .model.llm import ntk_alpha
from .model.qwenvl import image_span_starts


@dataclass
class _Stored:
    cache: KVCache  # batch 1, exactly as long as the tokens
    pictures: tuple[str, ...]  # digests of the images of the tokens' spans, in order; () if not known
    alpha: float  # its prefill's NTK alpha, kept on the host: reading it back would wait for the GPU


class PrefixCache:
    """Finished sequences' keys and values (batch-1 caches), most recent last, keyed by their ids.

    A sequence's images may be given as digests (`conversation.image_name`): a span is then only
    reused for the same picture, whatever reference it names. Without them (`model.chat`, whose
    spans name files), the references alone tell pictures apart.
    """

    def __init__(self, max_entries: int = 1):
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[int, ...], _Stored] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def keep(self, tokens: Sequence[int], cache: KVCache, pictures: Sequence[str] = ()) -> None:
        """Remember `tokens`, whose keys and values are the first len(tokens) of the batch-1 `cache`
        (a copy of just those is kept), and the digests of their spans' images."""
        if self.max_entries <= 0:
            return
        stored = cache.select([0], capacity=len(tokens))
        key = tuple(tokens)
        self._entries[key] = _Stored(stored, tuple(pictures), float(stored.ntk_alpha[0]))
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def restore(self, model, prompt: Sequence[int], cache: KVCache, pictures: Sequence[str] = ()) -> int:
        """Copy the longest stored prefix of `prompt` that can be reused into the fresh batch-1
        `cache`; the number of prompt tokens it covers (0: none). `pictures`: as in `keep`."""
        if not self._entries:
            return 0
        visual = model.transformer.vision_config
        starts = image_span_starts(torch.as_tensor([list(prompt)]), visual.image_start_id)
        spans = [(start, start + visual.n_queries + 2) for _, start in starts]
        best, chosen, layout = 0, None, cache.layout
        for tokens, entry in self._entries.items():
            if entry.cache.layout != layout:  # kept for another model, dtype or device
                continue
            # keep one token to run
            shared = min(_shared_prefix(tokens, prompt), len(prompt) - 1)
            shared = _before_other_pictures(shared, spans, entry.pictures, pictures)
            if shared > best:
                best, chosen = shared, entry
        alpha = ntk_alpha(len(prompt), model.transformer.llm_config)
        # the stored keys were rotated with their own prefill's NTK alpha: reuse only when it matches
        if chosen is None or chosen.alpha != alpha:
            return 0
        cache.copy_prefix(chosen.cache, best)
        cache.set_lengths([best] * cache.batch_size)
        cache.ntk_alpha.fill_(alpha)
        cache.inv_freq.copy_(chosen.cache.inv_freq)
        return best


def _before_other_pictures(
    shared: int, spans: Sequence[tuple[int, int]], stored: Sequence[str], given: Sequence[str]
) -> int:
    """`shared` cut back to the start of the first image span it would cut in two or whose picture
    differs between the stored sequence and the prompt (when neither knows its pictures, the tokens
    decide)."""
    for k, (start, end) in enumerate(spans):
        if shared <= start:
            break
        known = bool(stored or given)
        same = not known or (k < len(stored) and k < len(given) and stored[k] == given[k])
        if shared < end or not same:
            return start
    return shared


def _shared_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
