"""The KV cache: preallocated keys and values that the caller owns and passes to the model.

Rows of a batch keep their own lengths, so prompts of different lengths decode side by side and
each row sees exactly what it would see alone. Each row also remembers the dynamic-NTK alpha of
its prefill, which the decoding steps after it reuse (SPEC 5).

Each layer's keys and values are a tensor of their own, on the device of the layer's block: a
model spread over several devices (`placement`) keeps each layer's cache beside its weights. The
rows' lengths and rotary tables live on the cache's `device`, where the logits come out.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from . import placement
from .config import LLMConfig


class KVCache:
    def __init__(
        self,
        cfg: LLMConfig,
        batch_size: int,
        capacity: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        layer_devices: Sequence[torch.device | str] | None = None,
    ):
        """`device`: the rows' lengths and rotary tables'; `layer_devices`: each layer's keys' and
        values' (default: all on `device`)."""
        layer_devices = list(layer_devices) if layer_devices is not None else [device] * cfg.num_hidden_layers
        if len(layer_devices) != cfg.num_hidden_layers:
            raise ValueError(f"{len(layer_devices)} layer devices for {cfg.num_hidden_layers} layers")
        shape = (batch_size, cfg.num_attention_heads, capacity, cfg.kv_channels)
        # per layer: [B, heads, capacity, d]
        self.keys = [torch.zeros(shape, dtype=dtype, device=where) for where in layer_devices]
        self.values = [torch.zeros(shape, dtype=dtype, device=where) for where in layer_devices]
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.ntk_alpha = torch.ones(batch_size, dtype=torch.float32, device=device)
        # rotary inverse frequencies of each row's prefill [B, rotary_dim/2], set by the prefill
        self.inv_freq = torch.zeros(batch_size, cfg.rotary_dim // 2, dtype=torch.float32, device=device)
        # The rows' lengths as the host knows them, so that a prefill or a plain step need not ask
        # the GPU (and wait for everything queued before) how long the rows are. Whatever writes
        # `lengths` keeps it in step (`advanced`, `set_lengths`, the decoder after each step);
        # None is always safe: the device is asked.
        self.held: list[int] | None = [0] * batch_size

    @classmethod
    def for_model(cls, model, batch_size: int, capacity: int) -> KVCache:
        """An empty cache for a `QwenVLForCausalLM`: in its LM head's dtype, each layer's keys on
        its block's device, the lengths where the logits come out."""
        head = model.lm_head.weight
        config = model.transformer.llm_config
        return cls(config, batch_size, capacity, head.dtype, head.device, placement.layer_devices(model))

    @property
    def empty(self) -> bool:
        """Known on the host to hold no token (False: holds some, or not known)."""
        return self.held is not None and not any(self.held)

    @empty.setter
    def empty(self, value: bool) -> None:
        self.held = [0] * self.batch_size if value else None

    def advanced(self, counts: list[int]) -> None:
        """`lengths` have grown by `counts` on the device: the host's mirror follows."""
        if self.held is not None:
            self.held = [n + c for n, c in zip(self.held, counts, strict=True)]

    def set_lengths(self, lengths: list[int]) -> None:
        """Every row's length, on the device and on the host."""
        self.lengths.copy_(torch.as_tensor(lengths, device=self.lengths.device))
        self.held = list(lengths)

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    @property
    def dtype(self) -> torch.dtype:
        return self.keys[0].dtype

    @property
    def device(self) -> torch.device:
        """Where the rows' lengths and rotary tables are (each layer's keys: `layer_devices`)."""
        return self.lengths.device

    @property
    def layer_devices(self) -> list[torch.device]:
        return [keys.device for keys in self.keys]

    @property
    def layout(self) -> tuple:
        """Layers, heads, head size, dtype and devices: what another cache must share to be copied."""
        _, heads, _, head_dim = self.keys[0].shape
        return len(self.keys), heads, head_dim, self.dtype, self.device, tuple(self.layer_devices)

    def positions(self, new_tokens: int) -> torch.Tensor:
        """Absolute positions [B, new_tokens] of the next tokens of every row."""
        steps = torch.arange(new_tokens, device=self.lengths.device)
        return self.lengths[:, None] + steps

    def write(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v [B, heads, L, d] at `positions` [B, L] of each row (on the layer's device).

        Indexed assignment, not scatter_: on CPU a bf16 scatter_ converts the whole layer of the
        cache to fp32 and back (53 us a layer for 365 positions instead of 6, growing with the
        capacity).
        """
        rows = torch.arange(k.shape[0], device=positions.device)[:, None]
        self.keys[layer][rows, :, positions] = k.transpose(1, 2)
        self.values[layer][rows, :, positions] = v.transpose(1, 2)

    def view(self, layer: int, kv_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[layer][:, :, :kv_length], self.values[layer][:, :, :kv_length]

    def select(self, rows: torch.Tensor | list[int], capacity: int | None = None) -> KVCache:
        """A cache holding only `rows` (a copy), e.g. to drop finished sequences from a batch;
        with `capacity`, only their first `capacity` positions."""
        host_rows = rows.tolist() if isinstance(rows, torch.Tensor) else list(rows)
        indexes: dict[torch.device, torch.Tensor] = {}

        def pick(tensor: torch.Tensor) -> torch.Tensor:
            if tensor.device not in indexes:
                indexes[tensor.device] = torch.as_tensor(host_rows, device=tensor.device)
            return tensor[indexes[tensor.device]]

        def cut(layers: list[torch.Tensor]) -> list[torch.Tensor]:
            return [pick(layer[:, :, :capacity]) for layer in layers]

        held = None if self.held is None else [self.held[i] for i in host_rows]
        return KVCache._of(
            cut(self.keys),
            cut(self.values),
            pick(self.lengths),
            pick(self.ntk_alpha),
            pick(self.inv_freq),
            held,
        )

    @classmethod
    def concat(cls, caches: Sequence[KVCache]) -> KVCache:
        """One cache holding the rows of all `caches` (capacity: the largest), laid out alike."""
        capacity = max(cache.capacity for cache in caches)

        def widened(layer: torch.Tensor) -> torch.Tensor:
            extra = capacity - layer.shape[2]
            return F.pad(layer, (0, 0, 0, extra)) if extra else layer

        layers = range(len(caches[0].keys))
        keys = [torch.cat([widened(cache.keys[i]) for cache in caches]) for i in layers]
        values = [torch.cat([widened(cache.values[i]) for cache in caches]) for i in layers]
        known = all(cache.held is not None for cache in caches)
        return cls._of(
            keys,
            values,
            torch.cat([cache.lengths for cache in caches]),
            torch.cat([cache.ntk_alpha for cache in caches]),
            torch.cat([cache.inv_freq for cache in caches]),
            [n for cache in caches for n in cache.held] if known else None,
        )

    def copy_prefix(self, source: KVCache, count: int) -> None:
        """The keys and values of `source`'s first `count` positions into every row of this cache
        (`source`: one row, or as many as this cache; its layout this cache's)."""
        for mine, theirs in zip(self.keys + self.values, source.keys + source.values, strict=True):
            mine[:, :, :count] = theirs[:, :, :count]

    @classmethod
    def _of(cls, keys, values, lengths, ntk_alpha, inv_freq, held) -> KVCache:
        cache = cls.__new__(cls)
        cache.keys, cache.values, cache.lengths = keys, values, lengths
        cache.ntk_alpha, cache.inv_freq, cache.held = ntk_alpha, inv_freq, held
        return cache
