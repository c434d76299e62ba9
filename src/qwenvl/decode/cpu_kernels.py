"""Our CPU kernels (`cpu_kernels.c`): products of a few rows over bf16 weights and over GPTQ's packed
int4 codes, for CPUs with AVX2 and FMA, at memory speed.

Why our own: on CPUs without native bf16 products (AVX2 only) PyTorch's one-row bf16 product read
the mid config's weights at 5-10 GB/s and its int4 kernel at about 7, where the memory gives 17-23
(`python -m benchmarks.cpu_products`). A decode step reads every weight once, so it takes what
those reads take.

On CPUs with AVX512-BF16 (Zen 4, Sapphire Rapids and later) the int4 product of bf16 rows takes
their dot products (`int4_bf16_dot.c`): the AVX2 kernel needs three instructions per 8
multiply-adds and could not keep up with the memory there (11 GB/s a thread).

The library is compiled from the C sources with the system's C compiler at first use, into a cache
folder keyed by the source's digest, and loaded with ctypes (which lets go of the GIL during a
call). Where there is no compiler, no x86-64 or no AVX2, `kernels()` is None and the products keep
PyTorch's kernels. `QWENVL_CPU_KERNELS=0` turns them off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).parent
SOURCES = (HERE / "cpu_kernels.c", HERE / "int4_bf16_dot.c")
HEADERS = (HERE / "bf16.h",)
# GCC's generic tuning splits unaligned 256-bit loads in two, which halved the int4 kernel's speed
FLAGS = (
    "-O3",
    "-shared",
    "-fPIC",
    "-fopenmp",
    "-std=c11",
    "-mno-avx256-split-unaligned-load",
    "-mno-avx256-split-unaligned-store",
    # a*b + c stays two roundings, as PyTorch's separate operations round (rotate_to_cache)
    "-ffp-contract=off",
)
MAX_ROWS = 8  # the int4 kernel's most rows (INT4_MAX_ROWS)

_P = ctypes.c_void_p
_I = ctypes.c_int64
_C = ctypes.c_int


class CpuKernels:
    """The loaded library's products, on contiguous CPU tensors: activations [rows, K] in fp32 or
    bf16, outputs [rows, N] in the same dtype."""

    def __init__(self, library: ctypes.CDLL):
        self._bf16 = library.bf16_product
        self._bf16.argtypes = [_P, ctypes.c_int, _I, _I, _P, _I, _P, _P, ctypes.c_int]
        self._int4 = library.int4_product
        # x, bf16, rows, K, qweight, scales, bf16 scales, qzeros, zero offset, N, group, bias, y, dot,
        # threads
        self._int4.argtypes = [_P, _C, _I, _I, _P, _P, _C, _P, _C, _I, _I, _P, _P, _C, _C]
        library.has_avx512_bf16.restype = ctypes.c_int
        # whether bf16 rows may take the int4 product through AVX512-BF16 dot products
        self.bf16_dot = bool(library.has_avx512_bf16())
        self._attend = library.attend_one_query
        strides = ctypes.POINTER(ctypes.c_int64)
        self._attend.argtypes = [
            _P,
            _P,
            _P,
            _P,
            _I,
            _I,
            _I,
            _I,
            strides,
            strides,
            strides,
            ctypes.c_float,
            _P,
            ctypes.c_int,
        ]
        self._bf16.restype = self._int4.restype = self._attend.restype = ctypes.c_int
        self._norm = library.add_rms_norm
        self._norm.argtypes = [_P, _P, _P, ctypes.c_float, _I, _I, _P, _P]
        self._norm.restype = ctypes.c_int
        self._rotate = library.rotate_to_cache
        self._rotate.argtypes = [_P, _I, _I, _I, _I, _P, _P, _P, _P, _I, _P, strides, _P, strides, _P]
        self._rotate.restype = ctypes.c_int

    def bf16_product(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x @ weight^T (+ bias): weight [N, K] bf16, bias [N] fp32; K a multiple of 8, N of 4."""
        rows, width = x.shape
        out = x.new_empty(rows, weight.shape[0])
        status = self._bf16(
            x.data_ptr(),
            x.dtype == torch.bfloat16,
            rows,
            width,
            weight.data_ptr(),
            weight.shape[0],
            _pointer(bias),
            out.data_ptr(),
            torch.get_num_threads(),
        )
        return _checked(status, out)

    def int4_product(
        self,
        x: torch.Tensor,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        qzeros: torch.Tensor,
        zero_offset: int,
        group: int,
        bias: torch.Tensor | None,
        dot: bool | None = None,
    ) -> torch.Tensor:
        """x times the weight scales * (code - zero), from GPTQ's qweight [K/8, N], scales [K/group, N]
        (fp32 or bf16) and qzeros [K/group, N/8] (zero points stored as zero - zero_offset modulo 16),
        plus bias [N] fp32. N a multiple of 32, group of 8. `dot`: bf16 rows through AVX512-BF16 dot
        products (`int4_bf16_dot.c`); None: where this CPU has them."""
        rows, width = x.shape
        if dot is None:
            dot = self.bf16_dot and x.dtype == torch.bfloat16
        elif dot and not (self.bf16_dot and x.dtype == torch.bfloat16):
            raise ValueError("AVX512-BF16 dot products take bf16 rows, on CPUs that have them")
        out = x.new_empty(rows, qweight.shape[1])
        status = self._int4(
            x.data_ptr(),
            x.dtype == torch.bfloat16,
            rows,
            width,
            qweight.data_ptr(),
            scales.data_ptr(),
            scales.dtype == torch.bfloat16,
            qzeros.data_ptr(),
            zero_offset,
            qweight.shape[1],
            group,
            _pointer(bias),
            out.data_ptr(),
            dot,
            torch.get_num_threads(),
        )
        return _checked(status, out)

    def attend_one_query(
        self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """softmax(query keys^T / sqrt(D) + mask) values for one query: query [B, H, 1, D], keys and
        values [B, H, L, D] (any strides, each position's D values contiguous), mask [B, 1, 1, L]
        additive (0 or -inf), all bf16; D a multiple of 8 up to 256. Out [B, H, 1, D] bf16."""
        batch, heads, _, width = query.shape
        query = query.contiguous()
        out = torch.empty_like(query)
        status = self._attend(
            query.data_ptr(),
            keys.data_ptr(),
            values.data_ptr(),
            mask.data_ptr(),
            batch,
            heads,
            keys.shape[2],
            width,
            _strides(keys.stride()[:3]),
            _strides(values.stride()[:3]),
            _strides((mask.stride(0), mask.stride(-1))),
            width**-0.5,
            out.data_ptr(),
            torch.get_num_threads(),
        )
        return _checked(status, out)

    def add_rms_norm(
        self, x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, its RMS norm times weight), all bf16 and contiguous, x and delta [rows, width]
        (no delta: x itself), rounded where RMSNorm's PyTorch spelling rounds."""
        rows, width = x.shape
        total = x if delta is None else torch.empty_like(x)
        normed = torch.empty_like(x)
        self._norm(
            x.data_ptr(),
            _pointer(delta),
            weight.data_ptr(),
            eps,
            rows,
            width,
            None if delta is None else total.data_ptr(),
            normed.data_ptr(),
        )
        return total, normed

    def rotate_to_cache(
        self,
        qkv: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        logn: torch.Tensor | None,
        positions: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
    ) -> torch.Tensor:
        """A decode step's rotary, log-n scale and cache write (one token per row), as
        `TorchOps.rotate_and_store` computes them: qkv [B, 3 H D] bf16; cos and sin [B, R] fp32 (sin
        with its first half negated); logn [B] bf16 or None; positions [B] int64; keys and values
        the layer's cache [B, H, capacity, D] bf16, each position's D values contiguous. Returns the
        queries [B, H, 1, D]."""
        batch, heads, capacity, width = keys.shape
        query = qkv.new_empty(batch, heads, 1, width)
        status = self._rotate(
            qkv.data_ptr(),
            batch,
            heads,
            width,
            cos.shape[-1],
            cos.data_ptr(),
            sin.data_ptr(),
            _pointer(logn),
            positions.data_ptr(),
            capacity,
            keys.data_ptr(),
            _strides(keys.stride()[:3]),
            values.data_ptr(),
            _strides(values.stride()[:3]),
            query.data_ptr(),
        )
        if status == -2:
            raise IndexError(f"a position is outside the cache ({capacity} positions)")
        return query


def _checked(status: int, out: torch.Tensor) -> torch.Tensor:
    if status == -2:
        raise ValueError(f"the int4 kernel takes at most {MAX_ROWS} rows")
    if status == -3:
        raise ValueError("AVX512-BF16 dot products take bf16 rows and a multiple of 16 outputs")
    if status != 0:
        raise MemoryError("the CPU kernel could not allocate its working memory")
    return out


def _strides(strides: tuple[int, ...]):
    return (ctypes.c_int64 * len(strides))(*strides)


def _pointer(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


@functools.cache
def kernels() -> CpuKernels | None:
    """The kernels where this machine can build and run them, else None."""
    if os.environ.get("QWENVL_CPU_KERNELS", "1") == "0" or platform.machine() not in ("x86_64", "AMD64"):
        return None
    try:
        library = ctypes.CDLL(str(_built_library()))
    except (OSError, subprocess.SubprocessError):
        return None
    library.has_avx2_fma.restype = ctypes.c_int
    return CpuKernels(library) if library.has_avx2_fma() else None


def _built_library() -> Path:
    source = b"".join(path.read_bytes() for path in (*SOURCES, *HEADERS))
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler")
    digest = hashlib.sha256(source + " ".join(FLAGS).encode() + compiler.encode()).hexdigest()[:16]
    target = _cache_folder() / f"cpu_kernels-{digest}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # built beside the target, then renamed: processes building at once each finish a whole file
    with tempfile.TemporaryDirectory(dir=target.parent) as work:
        built = Path(work) / target.name
        subprocess.run(
            [compiler, *FLAGS, *map(str, SOURCES), "-o", str(built), "-lm"],
            check=True,
            capture_output=True,
            timeout=120,
        )
        os.replace(built, target)
    return target


def _cache_folder() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "qwenvl" / "kernels"
