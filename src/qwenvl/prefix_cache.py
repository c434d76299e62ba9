"""Keys and values of finished sequences, kept for prompts that start the same way.

The next turn of a conversation starts with the previous turn's prompt and reply: its keys and
values are copied from here, and only the new tokens run through the model (the images and the
history are not encoded again). The serving engine keeps several sequences; a caller of
`model.chat` keeps one conversation's (`PrefixCache()`, passed as `prefix_cache=`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

from .cache import KVCache
from .model.llm import ntk_alpha
from .model.qwenvl import image_span_starts


class PrefixCache:
    """Finished sequences' keys and values (batch-1 caches), most recent last, keyed by their ids."""

    def __init__(self, max_entries: int = 1):
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[int, ...], KVCache] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def keep(self, tokens: Sequence[int], cache: KVCache) -> None:
        """Remember `tokens`, whose keys and values are the first len(tokens) of the batch-1 `cache`
        (a copy of just those is kept)."""
        if self.max_entries <= 0:
            return
        stored = cache.select([0])
        stored.keys = stored.keys[:, :, :, : len(tokens)].clone()
        stored.values = stored.values[:, :, :, : len(tokens)].clone()
        key = tuple(tokens)
        self._entries[key] = stored
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def restore(self, model, prompt: Sequence[int], cache: KVCache) -> int:
        """Copy the longest stored prefix of `prompt` that can be reused into the fresh batch-1
        `cache`; the number of prompt tokens it covers (0: none)."""
        shared, stored = self._longest_prefix(prompt)
        # keep one token to run, and never cut an image span in two
        shared = min(shared, len(prompt) - 1)
        visual = model.transformer.vision_config
        span = visual.n_queries + 2
        for _, start in image_span_starts(torch.as_tensor([list(prompt)]), visual.image_start_id):
            if start < shared < start + span:
                shared = start
        alpha = ntk_alpha(len(prompt), model.transformer.llm_config)
        # the stored keys were rotated with their own prefill's NTK alpha: reuse only when it matches
        if stored is None or shared <= 0 or float(stored.ntk_alpha[0]) != alpha:
            return 0
        cache.keys[:, :, :, :shared] = stored.keys[:, :, :, :shared]
        cache.values[:, :, :, :shared] = stored.values[:, :, :, :shared]
        cache.lengths.fill_(shared)
        cache.ntk_alpha.fill_(alpha)
        cache.inv_freq.copy_(stored.inv_freq)
        return shared

    def _longest_prefix(self, prompt: Sequence[int]) -> tuple[int, KVCache | None]:
        """(shared length, cache) of the stored sequence sharing the longest prefix with `prompt`."""
        best, best_cache = 0, None
        for tokens, cache in self._entries.items():
            shared = _shared_prefix(tokens, prompt)
            if shared > best:
                best, best_cache = shared, cache
        return best, best_cache


def _shared_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
