"""The KV cache: preallocated keys and values that the caller owns and passes to the model.

Rows of a batch keep their own lengths, so prompts of different lengths decode side by side and
each row sees exactly what it would see alone. Each row also remembers the dynamic-NTK alpha of
its prefill, which the decoding steps after it reuse (SPEC 5).
"""

from __future__ import annotations

import torch

from .config import LLMConfig


class KVCache:
    def __init__(
        self,
        cfg: LLMConfig,
        batch_size: int,
        capacity: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        shape = (cfg.num_hidden_layers, batch_size, cfg.num_attention_heads, capacity, cfg.kv_channels)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.ntk_alpha = torch.ones(batch_size, dtype=torch.float32, device=device)
        # rotary inverse frequencies of each row's prefill [B, rotary_dim/2], set by the prefill
        self.inv_freq = torch.zeros(batch_size, cfg.rotary_dim // 2, dtype=torch.float32, device=device)
        # The rows' lengths as the host knows them, so that a prefill or a plain step need not ask
        # the GPU (and wait for everything queued before) how long the rows are. Whatever writes
        # `lengths` keeps it in step (`advanced`, `set_lengths`, the decoder after each step);
        # None is always safe: the device is asked.
        self.held: list[int] | None = [0] * batch_size

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
        return self.keys.shape[1]

    @property
    def capacity(self) -> int:
        return self.keys.shape[3]

    def positions(self, new_tokens: int) -> torch.Tensor:
        """Absolute positions [B, new_tokens] of the next tokens of every row."""
        steps = torch.arange(new_tokens, device=self.lengths.device)
        return self.lengths[:, None] + steps

    def write(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v [B, heads, L, d] at `positions` [B, L] of each row.

        Indexed assignment, not scatter_: on CPU a bf16 scatter_ converts the whole layer of the
        cache to fp32 and back (53 us a layer for 365 positions instead of 6, growing with the
        capacity).
        """
        rows = torch.arange(k.shape[0], device=positions.device)[:, None]
        self.keys[layer][rows, :, positions] = k.transpose(1, 2)
        self.values[layer][rows, :, positions] = v.transpose(1, 2)

    def view(self, layer: int, kv_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[layer, :, :, :kv_length], self.values[layer, :, :, :kv_length]

    def select(self, rows: torch.Tensor | list[int]) -> KVCache:
        """A cache holding only `rows` (a copy), e.g. to drop finished sequences from a batch."""
        picked = KVCache.__new__(KVCache)
        host_rows = rows.tolist() if isinstance(rows, torch.Tensor) else list(rows)
        rows = torch.as_tensor(host_rows, device=self.lengths.device)
        picked.keys, picked.values = self.keys[:, rows], self.values[:, rows]
        picked.lengths, picked.ntk_alpha = self.lengths[rows], self.ntk_alpha[rows]
        picked.inv_freq = self.inv_freq[rows]
        picked.held = None if self.held is None else [self.held[i] for i in host_rows]
        return picked
