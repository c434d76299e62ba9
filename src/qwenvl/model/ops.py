"""The operations the LLM's layers are written in, and their reference implementation in PyTorch.

The transformer block exists once (`llm.QWenBlock`), written in these six operations. A backend
implements them its own way (`qwenvl.decode`: Triton kernels for a GPU's decode steps, oneDNN's
weight layouts on CPU) and is passed in; `TorchOps` is plain PyTorch, what training and the
model's own `forward` run, and what every backend falls back to for the shapes it does not take.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TorchOps:
    """The layers' operations in plain PyTorch. Stateless: one instance serves every model."""

    name = "torch"

    def add_norm(
        self, x: torch.Tensor, delta: torch.Tensor | None, norm: nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, norm(x + delta)); with no delta, (x, norm(x)). The residual stream's add,
        done where the norm after it is (the block's branches return what the next norm adds)."""
        if delta is not None:
            x = x + delta
        return x, norm(x)

    def project(self, linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """linear(x) for x [B, L, in]."""
        return linear(x)

    def rotate_and_store(
        self, qkv: torch.Tensor, step, layer: int, heads: int, head_dim: int
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Queries, keys and values [B, heads, L, d] of c_attn's output [B, L, 3 * heads * d]:
        rotary on queries and keys, the log-n scale on queries, keys and values written into the
        step's cache (when it has one)."""
        batch, length, _ = qkv.shape
        qkv = qkv.view(batch, length, 3, heads, head_dim)
        query, key = step.rotary.apply(qkv[:, :, :2]).unbind(2)
        value = qkv[:, :, 2]
        if step.logn is not None:
            query = query * step.logn[:, :, None, None]
        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        if step.cache is not None:
            step.cache.write(layer, step.positions, key, value)
        return query, key, value

    def attention(
        self, query: torch.Tensor, key: torch.Tensor | None, value: torch.Tensor | None, step, layer: int
    ) -> torch.Tensor:
        """Attention [B, L, heads * d] of queries [B, heads, L, d]: causal over the new keys when
        every row starts at 0, else over the keys of the cache each row sees."""
        if step.fresh:
            out = F.scaled_dot_product_attention(query, key, value, is_causal=True)
        else:
            keys, values = step.cache.view(layer, step.kv_length)
            out = self.attend_to_cache(query, keys, values, step.visible)
        batch, heads, length, head_dim = out.shape
        return out.transpose(1, 2).reshape(batch, length, heads * head_dim)

    def attend_to_cache(
        self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Queries [B, heads, L, d] against the cache's keys under the additive `mask`."""
        return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask)

    def mlp(self, mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The MLP: c_proj(w1(x) * silu(w2(x)))."""
        return self.project(mlp.c_proj, self.project(mlp.w1, x) * F.silu(self.project(mlp.w2, x)))

    def logits(self, head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head's logits of hidden states [..., hidden]."""
        return head(hidden)


TORCH_OPS = TorchOps()
