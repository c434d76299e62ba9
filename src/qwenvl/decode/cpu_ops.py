"""The CPU backend: the layers' products through copies of the weights in the layouts CPU kernels
read fastest, the attention of one query spelled out in bf16, and bf16 norms and rotary in one
call each.

A decode step reads every weight of the LLM once per token, so on CPU it takes what its
matrix-vector products take, and those depend on the weight's layout. Measured on two EPYC cores
(AVX512-BF16), each weight read from memory (not cache):

- bf16, every Linear of the blocks and the LM head: oneDNN's blocked layout reads 23-26 GB/s
  where F.linear over the checkpoint's [out, in] layout reads 14-19 (the 151936 x 1024 head in
  12 ms instead of 17; 1.3-2.2x at 8 and 32 rows, 1.15-1.6x for a prefill's 40 or 301), with the
  same bits as F.linear. Our kernel (below) reads faster still at one and two rows, so decode
  steps take it (`OWN_KERNEL_ROWS`).
- fp32 LM head: [hidden, vocab] (a transposed copy): 3.8-5 ms instead of 12-13 ms for
  151936 x 128, 29 instead of 43 for 151936 x 1024. fp32 blocks keep their weights: oneDNN's
  layout would read them 1.3-1.9x faster, but its sums round otherwise than F.linear's, and fp32
  is the dtype whose outputs must match the original's to the last bits.

Without native bf16 products (AVX2 only: no AVX512-BF16, no AMX) PyTorch emulates them, and a
bf16 product of many rows takes several times its fp32 one: a prefill's products of 301 rows of
the mid-size model took 3-5x longer (5504 x 1024: 202 ms against 62, the weight converted to fp32
in the call included). There, products of `FP32_ROWS` rows or more convert the bf16 weight and
compute in fp32; fewer rows (a decode step, batches of up to 16 or so) read the bf16 weight, half
the bytes, which measured faster (8 rows: 6.3 ms against 14.6 converted, 10.4 from a kept fp32
copy).

There too, products of up to `KERNEL_ROWS` rows (decode steps, batches, short prompts) go through
our own kernel (`cpu_kernels.c`), which reads the bf16 weights where they lie, where the C compiler
can build it: at one row 1.15-1.5x the speed of PyTorch's emulated product on two threads, at 4
rows 3.8-4.2x on one (`python -m benchmarks.cpu_products`), and at 16 to 128 rows 1.1-11x
converting the weight to fp32 (the LM head of 32 rows: 108 ms against 732). Without it, the
`FP32_ROWS` rule above holds.

Where our kernels build, a bf16 residual add and the RMS norm after it are one call of theirs
(PyTorch's eager norm is a dozen small operations, about 1 ms of a mid-size model's step), and so
are a bf16 decode step's rotary, log-n scale and cache write (another 0.8 ms), and its attention.

Int4 layers (`int4.Int4Linear`) take the products of `int4_cpu.py`: our kernel over the GPTQ codes
for decode steps, and a copy of the codes in PyTorch's int4 kernel's layout for prompts (half a
byte a weight, always made).

The copies are made when the backend is built (`CpuOps(model)`), never by a forward, and cost
their weights' memory once more: the bf16 copies only while that fits in half the memory the
system has free (`pack_bf16=None`). `current()` tells whether the weights are still the ones
copied (an optimizer step or a reload changes them).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..int4.linear import Int4Linear
from ..model.llm import RMSNorm
from ..model.ops import TorchOps
from . import cpu_kernels
from .int4_cpu import int4_product

Product = Callable[[torch.Tensor], torch.Tensor]

# without native bf16 products: bf16 products of this many rows or more compute in fp32 (the
# crossing point measured on an AVX2 EPYC was 24 to 32 rows)
FP32_ROWS = 32
# there, products of up to this many rows take our kernel (at 128 it still led the fp32 products
# by 1.1-1.6x on the mid config's shapes)
KERNEL_ROWS = 128
# with native bf16 products, products of up to this many bf16 rows still take our kernel: on Zen 4
# cores (AVX512-BF16) it read one row's weights at 31-33 GB/s where oneDNN's read 23-27 (a mid
# decode step 15% faster), two rows 1.3-1.5x; at 4 and 8 rows oneDNN's led
OWN_KERNEL_ROWS = 2
# what a front end tells someone who asks for bf16 on such a CPU
BF16_WITHOUT_NATIVE_PRODUCTS = (
    "note: this CPU has no native bf16 matrix products (no AVX512-BF16 or AMX), so PyTorch emulates "
    "them. A prompt's products run in fp32 here (the bf16 weights converted as they are read: the "
    "first token takes about fp32's time), decoding one row reads half of fp32's bytes and is "
    "faster, but batches of several rows gain less from batching than in fp32; --fp32 keeps "
    "twice the memory for the weights and decodes one row slower."
)


class CpuOps(TorchOps):
    """TorchOps with the weights' faster copies (see the module's docstring)."""

    name = "cpu"

    def __init__(self, model, pack_bf16: bool | None = None, own_kernels: bool = True):
        """`pack_bf16`: oneDNN copies of the bf16 weights; None: while they fit in half the free
        memory; True: always; False: never. `own_kernels`: our kernels (`cpu_kernels.py`) where
        they build; False: PyTorch's products only."""
        self._products: dict[nn.Module, Product] = {}
        self._copied: dict[nn.Module, tuple] = {}
        linears = list(_llm_linears(model.transformer, model.lm_head))
        head = model.lm_head
        int4 = [m for m in model.transformer.h.modules() if isinstance(m, Int4Linear)]
        # built (or loaded) only for a model that has products of theirs: bf16 ones or Int4 layers
        wanted = own_kernels and (head.weight.dtype == torch.bfloat16 or bool(int4))
        self.kernels = cpu_kernels.kernels() if wanted else None
        if _plain(head) and head.weight.dtype == torch.float32 and head.bias is None:
            self._add(head, _TransposedHead(head))
        bf16 = [linear for linear in linears if linear.weight.dtype == torch.bfloat16]
        packed = bool(bf16) and pack_bf16 is not False and onednn_bf16()
        if packed and not pack_bf16:
            packed = sum(linear.weight.nbytes for linear in bf16) <= free_memory() // 2
        for linear in bf16:
            if packed:
                self._add(linear, _PackedBF16(linear, self.kernels))
            elif self.kernels is not None and _FewRowsBF16.takes(linear):
                self._add(linear, _FewRowsBF16(linear, self.kernels))
        for linear in int4:
            product = int4_product(linear, head.weight.dtype, self.kernels)
            if product is not None:
                self._add(linear, product)

    def _add(self, linear: nn.Module, product: Product) -> None:
        self._products[linear] = product
        self._copied[linear] = _state(linear)

    def current(self) -> bool:
        """Whether every copied weight is still the one copied (same storage, no in-place change)."""
        return all(_state(linear) == state for linear, state in self._copied.items())

    @property
    def copies(self) -> int:
        """How many weights have a copy."""
        return len(self._products)

    def project(self, linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return linear(x)
        product = self._products.get(linear)
        if product is not None:
            return product(x)
        if x.dtype == torch.bfloat16 and _plain(linear) and not onednn_bf16():
            return _emulated_bf16(linear, x)
        return linear(x)

    def logits(self, head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return self.project(head, hidden)

    def add_norm(self, x, delta, norm):
        """bf16 rows through our kernel: PyTorch's eager RMS norm is a dozen small operations, a
        millisecond of a mid-size model's step."""
        if self.kernels is None or not _norm_kernel_takes(x, delta, norm):
            return super().add_norm(x, delta, norm)
        width = x.shape[-1]
        rows = x.reshape(-1, width)
        total, normed = self.kernels.add_rms_norm(
            rows, None if delta is None else delta.reshape(-1, width), norm.weight.detach(), norm.eps
        )
        return total.view(x.shape), normed.view(x.shape)

    def rotate_and_store(self, qkv, step, layer, heads, head_dim):
        """A bf16 decode step's rotary, log-n scale and cache write in one call of our kernel, the
        same bits as PyTorch's dozen small operations a layer (about 0.8 ms of a mid-size step)."""
        if self.kernels is None or not _rotary_kernel_takes(qkv, step, layer, heads, head_dim):
            return super().rotate_and_store(qkv, step, layer, heads, head_dim)
        batch = qkv.shape[0]
        rotary = step.rotary
        query = self.kernels.rotate_to_cache(
            qkv.view(batch, -1),
            rotary.cos.view(batch, -1),
            rotary.signed_sin.view(batch, -1),
            None if step.logn is None else step.logn.view(batch),
            step.positions.view(batch),
            step.cache.keys[layer],
            step.cache.values[layer],
        )
        return query, None, None  # the keys and values are in the cache

    def attend_to_cache(self, query, keys, values, mask):
        """One query per row in bf16 or fp16, spelled out: two matrix products in the inputs' dtype
        around an fp32 softmax. SDPA's CPU kernel takes longer there (one layer of a mid-size step,
        16 heads of 64, in bf16: 334 us instead of 117 over 365 keys, 2.0 ms instead of 0.28 over
        2048), while in fp32 it is the fast one."""
        if query.shape[2] != 1 or query.dtype not in (torch.bfloat16, torch.float16):
            return super().attend_to_cache(query, keys, values, mask)
        if self.kernels is not None and _cache_kernel_takes(query, keys, values, mask):
            return self.kernels.attend_one_query(query, keys, values, mask)
        scores = (query @ keys.transpose(-1, -2)).float() * query.shape[-1] ** -0.5 + mask.float()
        return scores.softmax(dim=-1).to(values.dtype) @ values


def _norm_kernel_takes(x, delta, norm) -> bool:
    """Whether our add-and-norm takes these: an RMSNorm of bf16 rows, no gradient wanted."""
    return (
        type(norm) is RMSNorm
        and not torch.is_grad_enabled()
        and x.dtype == norm.weight.dtype == torch.bfloat16
        and x.is_contiguous()
        and x.shape[-1] % 8 == 0
        and (delta is None or (delta.dtype == x.dtype and delta.shape == x.shape and delta.is_contiguous()))
    )


def _rotary_kernel_takes(qkv, step, layer, heads, head_dim) -> bool:
    """Whether our rotary and cache write takes this step: one token per row in bf16, written into
    a bf16 cache whose positions' values are contiguous, with no gradient wanted."""
    cache, rotary = step.cache, step.rotary
    if cache is None or step.fresh or torch.is_grad_enabled() or qkv.dim() != 3 or qkv.shape[1] != 1:
        return False
    keys, values = cache.keys[layer], cache.values[layer]
    return (
        qkv.dtype == keys.dtype == values.dtype == torch.bfloat16
        and qkv.is_contiguous()
        and qkv.shape[2] == 3 * heads * head_dim
        and keys.shape[1] == heads
        and keys.shape[3] == head_dim
        and keys.stride(-1) == values.stride(-1) == 1
        and rotary.cos.dtype == rotary.signed_sin.dtype == torch.float32
        and rotary.cos.is_contiguous()
        and rotary.signed_sin.is_contiguous()
        and rotary.cos.shape[-1] <= head_dim
        and rotary.cos.shape[-1] % 2 == 0
        and rotary.cos.numel() == qkv.shape[0] * rotary.cos.shape[-1]
        and (step.logn is None or (step.logn.dtype == torch.bfloat16 and step.logn.numel() == qkv.shape[0]))
        and step.positions.dtype == torch.int64
        and step.positions.is_contiguous()
    )


def _cache_kernel_takes(query, keys, values, mask) -> bool:
    """Whether our one-query attention takes these: bf16 throughout (its mask too), the positions'
    values contiguous, a head size it holds. Also where the CPU has native bf16 products: there
    PyTorch's two small products still took 2.4-2.9x ours (16 heads of 64 over 300 positions, on
    Zen 4 cores with AVX512-BF16)."""
    width = query.shape[-1]
    return (
        all(t.dtype == torch.bfloat16 for t in (query, keys, values, mask))
        and keys.stride(-1) == 1
        and values.stride(-1) == 1
        and mask.dim() == 4
        and mask.shape[1] == mask.shape[2] == 1
        and width % 8 == 0
        and width <= 256
    )


class _TransposedHead:
    def __init__(self, linear: nn.Linear):
        with torch.no_grad():
            self.weight = linear.weight.detach().t().contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


class _FewRowsBF16:
    """A bf16 Linear's products of a few rows through our kernel: up to `KERNEL_ROWS` where the CPU
    has no native bf16 products, `OWN_KERNEL_ROWS` where it has; more rows through PyTorch's."""

    def __init__(self, linear: nn.Linear, kernels: cpu_kernels.CpuKernels):
        self.linear, self.kernels = linear, kernels
        self.weight = linear.weight.detach()
        self.bias = None if linear.bias is None else linear.bias.detach().float()
        self.native = onednn_bf16()
        self.most_rows = OWN_KERNEL_ROWS if self.native else KERNEL_ROWS

    @staticmethod
    def takes(linear: nn.Linear) -> bool:
        out_features, in_features = linear.weight.shape
        return linear.weight.is_contiguous() and in_features % 8 == 0 and out_features % 4 == 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if x.dtype != torch.bfloat16 or rows > self.most_rows:
            return self.linear(x) if self.native else _emulated_bf16(self.linear, x)
        out = self.kernels.bf16_product(x.reshape(rows, -1).contiguous(), self.weight, self.bias)
        return out.view(*x.shape[:-1], -1)


def _emulated_bf16(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A bf16 product where the CPU has no native one: the rows of a prompt in fp32."""
    if x.dtype == torch.bfloat16 and x.numel() >= FP32_ROWS * x.shape[-1]:
        bias = None if linear.bias is None else linear.bias.float()
        return F.linear(x.float(), linear.weight.float(), bias).to(x.dtype)
    return linear(x)


class _PackedBF16:
    """oneDNN's product over its copy of the weight; decode steps of up to `OWN_KERNEL_ROWS` rows
    through our kernel over the Linear's own weight, where it builds."""

    def __init__(self, linear: nn.Linear, kernels: cpu_kernels.CpuKernels | None = None):
        # the layout oneDNN picks for one row at a time; it serves any number of rows
        with torch.no_grad():
            self.weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1)
        self.bias = None if linear.bias is None else linear.bias.detach()
        self.few_rows = _FewRowsBF16(linear, kernels) if kernels and _FewRowsBF16.takes(linear) else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if (
            self.few_rows is not None
            and x.dtype == torch.bfloat16
            and x.numel() <= OWN_KERNEL_ROWS * x.shape[-1]
        ):
            return self.few_rows(x)
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def _llm_linears(transformer, head: nn.Module) -> Iterator[nn.Linear]:
    for block in transformer.h:
        for linear in (block.attn.c_attn, block.attn.c_proj, block.mlp.w1, block.mlp.w2, block.mlp.c_proj):
            if _plain(linear):
                yield linear
    if _plain(head):
        yield head


def _plain(linear: nn.Module) -> bool:
    # adapters (peft wraps the Linear) need the module's own forward
    return type(linear) is nn.Linear


@functools.cache
def onednn_bf16() -> bool:
    """Whether oneDNN computes bf16 products natively on this CPU (AVX512-BF16 or AMX)."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def free_memory() -> int:
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


def _state(linear: nn.Module) -> tuple:
    if isinstance(linear, Int4Linear):
        weights = (linear.qweight, linear.qzeros, linear.scales, linear.g_idx)
    else:
        weights = (linear.weight,)
    return (*map(_tensor_state, weights), _tensor_state(linear.bias), *(w.dtype for w in weights))


def _tensor_state(tensor: torch.Tensor | None) -> tuple:
    if tensor is None:
        return ()
    try:
        version = tensor._version
    except RuntimeError:  # inference tensors keep no version counter
        version = -1
    return (version, tensor.data_ptr())
