"""Copies of the LLM's weights in the layouts CPU kernels read fastest, for inference.

A decode step reads every weight of the LLM once per token, so on CPU it takes what its
matrix-vector products take, and those depend on the weight's layout. Measured on two EPYC cores
(AVX512-BF16), each weight read from memory (not cache):

- bf16, every Linear of the blocks and the LM head: oneDNN's blocked layout reads 23-26 GB/s
  where F.linear over the checkpoint's [out, in] layout reads 14-19 (the 151936 x 1024 head in
  12 ms instead of 17, a 5504 x 1024 weight in 0.40 ms instead of 0.75; 1.3-2.2x at 8 and 32
  rows, 1.15-1.6x for a prefill's 40 or 301), and gives the same bits as F.linear. Every
  forward without gradients uses them, prefills too.
- fp32 LM head of a decode step: [hidden, vocab] (a transposed copy): 3.8-5 ms instead of 12-13
  ms for 151936 x 128, 29 instead of 43 for 151936 x 1024. fp32 blocks keep their weights:
  oneDNN's layout would read them 1.3-1.9x faster, but its sums round otherwise than F.linear's,
  and fp32 is the dtype whose outputs must match the original's to the last bits.

Each copy costs its weight's memory once (a bf16 model's LLM weights twice over); the bf16 copies
are only made while that fits in half the memory the system has free (`PACK_BF16`). A copy
follows its weight: an in-place update (an optimizer step) or new storage makes it again.
"""

from __future__ import annotations

import functools
import os
import weakref
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

Product = Callable[[torch.Tensor], torch.Tensor]

# bf16 copies in oneDNN's layout: None: while they fit in half the free memory; True: always;
# False: never
PACK_BF16: bool | None = None

# id(weight) -> (a weak reference to it, its state and its bias's when copied, the product); an
# entry goes with its weight (tensors compare elementwise, so they cannot be WeakKeyDictionary keys)
_COPIES: dict[int, tuple[weakref.ref, tuple, Product]] = {}


def cpu_products(transformer, head: nn.Module | None = None, packed: bool = True) -> dict[nn.Module, Product]:
    """For a model on CPU: the products of its Linear modules (the blocks', and `head`, the LM
    head of a decode step) that a forward without gradients should use instead of the modules'
    own (`Step.project`); empty elsewhere, and for Linears wrapped by adapters. `packed`: include
    oneDNN's bf16 layout (False: for a step torch.compile traces)."""
    if transformer.wte.weight.device.type != "cpu":
        return {}
    products: dict[nn.Module, Product] = {}
    if head is not None and _plain(head) and head.weight.dtype == torch.float32 and head.bias is None:
        products[head] = _current(head) or _make(head, _TransposedHead)
    if packed:
        products.update(_packed_bf16(_llm_linears(transformer, head)))
    return products


def head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """model.lm_head(hidden): without gradients in bf16 on CPU through the head's packed copy (the
    same bits, 12 ms instead of 17-20 for a mid-size model's first token)."""
    head = model.lm_head
    if not torch.is_grad_enabled() and head.weight.device.type == "cpu" and _plain(head):
        product = _packed_bf16([head]).get(head)
        if product is not None:
            return product(hidden)
    return head(hidden)


def _packed_bf16(linears: Iterable[nn.Linear]) -> dict[nn.Module, Product]:
    """Packed copies of the bf16 Linears among `linears`: all of them, or none where the missing
    ones do not fit (or `PACK_BF16` is False)."""
    if PACK_BF16 is False or not _onednn_bf16():
        return {}
    products, missing = {}, []
    for linear in linears:
        if linear.weight.dtype == torch.bfloat16:
            product = _current(linear)
            if product is None:
                missing.append(linear)
            else:
                products[linear] = product
    if missing:
        size = sum(linear.weight.nbytes for linear in missing)
        if not PACK_BF16 and size > _free_memory() // 2:
            return {}
        products.update((linear, _make(linear, _PackedBF16)) for linear in missing)
    return products


class _TransposedHead:
    def __init__(self, linear: nn.Linear):
        self.weight = linear.weight.detach().t().contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


class _PackedBF16:
    def __init__(self, linear: nn.Linear):
        # the layout oneDNN picks for one row at a time; it serves any number of rows
        self.weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def _llm_linears(transformer, head: nn.Module | None) -> Iterator[nn.Linear]:
    for block in transformer.h:
        for linear in (block.attn.c_attn, block.attn.c_proj, block.mlp.w1, block.mlp.w2, block.mlp.c_proj):
            if _plain(linear):
                yield linear
    if head is not None and _plain(head):
        yield head


def _plain(linear: nn.Module) -> bool:
    # adapters (peft wraps the Linear) need the module's own forward
    return type(linear) is nn.Linear


@functools.cache
def _onednn_bf16() -> bool:
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _free_memory() -> int:
    """Bytes the system can hand out now: Linux's MemAvailable (free memory and the page cache it
    can drop, such as a checkpoint just read), else free pages; 0 where it cannot tell."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # no copies on a guess
        return 0


def _state(tensor: torch.Tensor | None) -> tuple:
    if tensor is None:
        return ()
    try:
        version = tensor._version
    except RuntimeError:  # inference tensors keep no version counter
        version = -1
    return (version, tensor.data_ptr())


def _linear_state(linear: nn.Linear) -> tuple:
    return (_state(linear.weight), _state(linear.bias), linear.weight.dtype)


def _current(linear: nn.Linear) -> Product | None:
    """The copy made of `linear`'s weight, if the weight and bias have not changed since."""
    entry = _COPIES.get(id(linear.weight))
    if entry is None or entry[0]() is not linear.weight or entry[1] != _linear_state(linear):
        return None
    return entry[2]


def _make(linear: nn.Linear, layout: type) -> Product:
    weight = linear.weight
    key = id(weight)
    with torch.no_grad():
        product = layout(linear)

    def forget(ref: weakref.ref) -> None:
        current = _COPIES.get(key)
        if current is not None and current[0] is ref:
            del _COPIES[key]

    _COPIES[key] = (weakref.ref(weight, forget), _linear_state(linear), product)
    return product
