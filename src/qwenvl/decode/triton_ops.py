"""The Triton backend: a decode step's work in the kernels of `kernels.py`, the rest in PyTorch.

A step of one token per row takes the kernels: the residual adds with their norms, rotary and
the cache writes, flash decoding's attention, the MLP's gate, and (for one row) `matvec` for the
layers' products. Any other shape (a prefill, gradients, a step torch.compile traces) goes to
`TorchOps`. Eager, static and graphed steps take the same kernels, so they round alike.

Int4 layers (`int4.Int4Linear`) take the kernels of `int4_kernels.py` for up to 64 rows, prefill
or decode, reading their packed codes as they are.

Building the backend lays each MLP's w1 and w2 side by side (`pack_gate_weights`): one product
serves both. It is the backend's one change to the model, made when it is built.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..int4.linear import Int4Linear
from ..model.ops import TorchOps
from . import int4_kernels, kernels
from .settings import KernelSettings


class TritonOps(TorchOps):
    name = "triton"

    def __init__(self, model, settings: KernelSettings | None = None):
        if not kernels.available():
            raise RuntimeError("the Triton backend needs Triton (pip install triton)")
        device = model.lm_head.weight.device
        self.settings = settings if settings is not None else KernelSettings.for_device(device)
        self._model = model
        pack_gate_weights(model)
        # the Int4 layers its kernels take (`int4_kernels`; the others run their own forward)
        int4 = [layer for layer in model.transformer.h.modules() if isinstance(layer, Int4Linear)]
        self._int4 = {layer for layer in int4 if int4_kernels.takes(layer)}

    def current(self) -> bool:
        """Whether the gate weights it packed are still side by side (moving the model unpacks them)."""
        return all(
            gate_weights(block.mlp) is not None
            for block in self._model.transformer.h
            if _plain_gate(block.mlp)
        )

    def _takes(self, x: torch.Tensor) -> bool:
        """Whether rows x [B, 1, ...] are a decode step's that the kernels do."""
        return x.shape[1] == 1 and not torch.is_grad_enabled() and not torch.compiler.is_compiling()

    def _matvec(self, linear: nn.Module, x: torch.Tensor) -> bool:
        # adapters (peft wraps the Linear) keep their own forward; batches go to cuBLAS's kernels
        return (
            self.settings.matvec
            and type(linear) is nn.Linear
            and x.shape[0] * x.shape[1] == 1
            and linear.weight.is_contiguous()
            and linear.weight.numel() < 2**31
        )

    def add_norm(self, x, delta, norm):
        if not self._takes(x):
            return super().add_norm(x, delta, norm)
        batch, _, width = x.shape
        rows = x.reshape(batch, width)
        residual, normed = kernels.add_rms_norm(
            rows, None if delta is None else delta.reshape(batch, width), norm.weight, norm.eps, self.settings
        )
        return residual.view(batch, 1, width), normed.view(batch, 1, width)

    def project(self, linear, x):
        if linear in self._int4 and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            return int4_kernels.int4_linear(linear, x)
        if not (self._takes(x) and self._matvec(linear, x)):
            return linear(x)
        bias = None if linear.bias is None else linear.bias.detach()
        out = kernels.matvec(x.reshape(1, -1), linear.weight.detach(), self.settings, bias)
        return out.view(1, 1, -1)

    def rotate_and_store(self, qkv, step, layer, heads, head_dim):
        if not (self._takes(qkv) and step.cache is not None and not step.fresh):
            return super().rotate_and_store(qkv, step, layer, heads, head_dim)
        query = kernels.rotary_to_cache(
            qkv.reshape(qkv.shape[0], -1), step, layer, heads, head_dim, self.settings
        )
        return query, None, None  # the keys and values are in the cache

    def attention(self, query, key, value, step, layer):
        if step.fresh or not (self.settings.flash_decoding and self._takes(query.transpose(1, 2))):
            return super().attention(query, key, value, step, layer)  # reads the cache when not fresh
        out = kernels.decode_attention(query, step, layer, self.settings)  # [B, heads, d]
        return out.reshape(out.shape[0], 1, -1)

    def mlp(self, mlp, x):
        if not self._takes(x):
            return super().mlp(mlp, x)
        batch, _, width = x.shape
        rows = x.reshape(batch, width)
        both = gate_weights(mlp)
        if both is not None and self._matvec(mlp.c_proj, x) and mlp.c_proj.bias is None:
            # two products: w1 and w2 at once, then c_proj computing the gate as it reads its input
            out = kernels.matvec(rows.contiguous(), both, self.settings)
            half = mlp.w1.out_features
            gated = kernels.matvec(
                out[:, :half], mlp.c_proj.weight.detach(), self.settings, gate=out[:, half:]
            )
            return gated.view(batch, 1, -1)
        if both is not None:
            out = F.linear(rows, both)
            half = mlp.w1.out_features
            gated = kernels.silu_gate(out[:, :half], out[:, half:], self.settings)
        else:
            up, gate = self.project(mlp.w1, x).reshape(batch, -1), self.project(mlp.w2, x).reshape(batch, -1)
            gated = kernels.silu_gate(up, gate, self.settings)
        return self.project(mlp.c_proj, gated.view(batch, 1, -1))


def pack_gate_weights(model) -> int:
    """Lays each MLP's w2 right after its w1 in memory, so that one product serves both (`gate_weights`).

    At batch 1 on an H100, cuBLAS read w1 and w2 (11008 x 4096 each) at 2.6 TB/s, where the
    lm_head's larger product reached 2.85: the kernel it picked cuts 11008 rows into 86 blocks of
    128 for 132 multiprocessors. The parameters stay the same objects with the same values (only
    their storage moves), so optimizers and state dicts see no change; it costs one layer's w1 and
    w2 of memory while it runs. Moving the model (.to) unpacks them, and the step goes back to two
    products. Returns how many MLPs are packed.
    """
    packed = 0
    for block in model.transformer.h:
        mlp = block.mlp
        if not _plain_gate(mlp):
            continue
        up, gate = mlp.w1.weight, mlp.w2.weight
        if not _side_by_side(up, gate):
            # the new storage is of the weights' kind, whatever mode the caller holds: ordinary
            # weights may train afterwards
            with torch.inference_mode(up.is_inference()), torch.no_grad():
                both = torch.cat([up, gate])
                up.data, gate.data = both[: len(up)], both[len(up) :]
        packed += 1
    return packed


def _plain_gate(mlp) -> bool:
    # adapters (peft wraps the Linear) and biases need the modules' own forward
    up, gate = mlp.w1, mlp.w2
    return type(up) is type(gate) is torch.nn.Linear and up.bias is None and gate.bias is None


def _side_by_side(up: torch.Tensor, gate: torch.Tensor) -> bool:
    return (
        up.is_contiguous()
        and gate.is_contiguous()
        and up.dtype == gate.dtype
        and up.shape[1:] == gate.shape[1:]
        and up.untyped_storage().data_ptr() == gate.untyped_storage().data_ptr()
        and gate.storage_offset() == up.storage_offset() + up.numel()
    )


def gate_weights(mlp) -> torch.Tensor | None:
    """w1 and w2 as one [2 * width, hidden] matrix (a view, for inference) when
    `pack_gate_weights` laid them side by side and they have stayed so; otherwise None."""
    if not _plain_gate(mlp):
        return None
    up, gate = mlp.w1.weight, mlp.w2.weight
    if not _side_by_side(up, gate):
        return None
    return up.detach().as_strided((up.shape[0] + gate.shape[0], up.shape[1]), up.stride())
