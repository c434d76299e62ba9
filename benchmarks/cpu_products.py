"""CPU products of a decode step: our kernels (`qwenvl/decode/cpu_kernels.c`) against PyTorch's, on
the mid config's shapes, one product and one thread count at a time.

Run: .venv/bin/python -m benchmarks.cpu_products [--rows 1 2 4 8] [--threads 1 2] [--json PATH]

- bf16: PyTorch's product over the bf16 weight against ours over the same weight. PyTorch's is
  what the CPU backend would run without ours: `F.linear` on a CPU without native bf16, oneDNN's
  product over its copy of the weight in its own layout on one with them;
- int4: torch's `_weight_int4pack_mm_for_cpu` (bf16 activations) against ours over GPTQ's codes,
  groups of 128;
- attention: one query per head against a bf16 cache of 300 positions, 16 heads of 64, as
  `CpuOps.attend_to_cache` spells it in PyTorch, against ours.

Each product cycles through enough copies of its weight to leave the caches (about 200 MB), so
every call reads its weight from memory, as a decode step does. Both sides of a pair alternate
round after round and each keeps its best round: on a shared machine a pause hits one round,
not one side. The ratio is PyTorch's time over ours.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from qwenvl.decode.cpu_kernels import kernels
from qwenvl.decode.cpu_ops import onednn_bf16

from .common import MID_CONFIG, OtherLoad, add_json_option, json_path, markdown_table, save_record

GROUP = 128
WEIGHT_BYTES = 200 * 2**20
ROUNDS = 12
HIDDEN = MID_CONFIG["hidden_size"]
FFN = MID_CONFIG["intermediate_size"] // 2
# (name, out, in) of the mid config's products
SHAPES = (
    ("c_attn", 3 * HIDDEN, HIDDEN),
    ("attn.c_proj", HIDDEN, HIDDEN),
    ("w1 / w2", FFN, HIDDEN),
    ("mlp.c_proj", HIDDEN, FFN),
    ("lm_head", MID_CONFIG["vocab_size"], HIDDEN),
)


def best_of_alternating(calls: Sequence[Callable[[], object]], per_round: int) -> list[float]:
    """Each call's best seconds per invocation over ROUNDS rounds, the calls taking turns."""
    best = [float("inf")] * len(calls)
    for call in calls:
        call()
    for _ in range(ROUNDS):
        for index, call in enumerate(calls):
            start = time.perf_counter()
            for _ in range(per_round):
                call()
            best[index] = min(best[index], (time.perf_counter() - start) / per_round)
    return best


def cycling(items: list) -> Callable[[], object]:
    position = 0

    def next_item():
        nonlocal position
        position = (position + 1) % len(items)
        return items[position]

    return next_item


def bf16_pair(out_features: int, in_features: int, rows: int, own) -> tuple[list[float], int]:
    copies = max(2, WEIGHT_BYTES // (out_features * in_features * 2))
    weights = [torch.randn(out_features, in_features).bfloat16() for _ in range(copies)]
    x = torch.randn(rows, in_features).bfloat16()
    weight = cycling(weights)
    if onednn_bf16():
        packed = cycling([torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in weights])

        def pytorchs():
            return torch.ops.mkldnn._linear_pointwise(x, packed(), None, "none", [], "")
    else:

        def pytorchs():
            return F.linear(x, weight())

    times = best_of_alternating([pytorchs, lambda: own.bf16_product(x, weight(), None)], per_round=copies)
    return times, out_features * in_features * 2


def int4_pair(out_features: int, in_features: int, rows: int, own) -> tuple[list[float], int]:
    copies = max(2, WEIGHT_BYTES // (out_features * in_features // 2))
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    words = [
        torch.randint(-(2**31), 2**31 - 1, (in_features // 8, out_features), dtype=torch.int32)
        for _ in range(copies)
    ]
    codes = [
        ((w[:, None, :] >> shifts[None, :, None]) & 15).reshape(in_features, out_features) for w in words
    ]
    packed = [torch.ops.aten._convert_weight_to_int4pack_for_cpu(c.t().contiguous().int(), 2) for c in codes]
    # bf16 scales and zero points of 8, as a bf16 model holds them
    scales = (torch.rand(in_features // GROUP, out_features) * 0.01 + 0.001).bfloat16()
    qzeros = torch.full((in_features // GROUP, out_features // 8), 0x77777777, dtype=torch.int32)  # 8 - 1
    scales_and_offsets = torch.stack([scales, torch.zeros_like(scales)], dim=-1).contiguous()
    x = torch.randn(rows, in_features).bfloat16()
    pack, word = cycling(packed), cycling(words)
    times = best_of_alternating(
        [
            lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, pack(), GROUP, scales_and_offsets),
            lambda: own.int4_product(x, word(), scales, qzeros, 1, GROUP, None),
        ],
        per_round=copies,
    )
    return times, out_features * in_features // 2


def attention_pair(rows: int, own, positions: int = 300) -> tuple[list[float], int]:
    heads, width = MID_CONFIG["num_attention_heads"], MID_CONFIG["kv_channels"]
    copies = max(2, WEIGHT_BYTES // (2 * rows * heads * positions * width * 2))
    caches = [torch.randn(2, rows, heads, positions, width).bfloat16() for _ in range(copies)]
    query = torch.randn(rows, heads, 1, width).bfloat16()
    mask = torch.zeros(rows, 1, 1, positions).bfloat16()
    cache = cycling(caches)

    def spelled_out():
        keys, values = cache()
        scores = (query @ keys.transpose(-1, -2)).float() * width**-0.5 + mask.float()
        return scores.softmax(dim=-1).to(values.dtype) @ values

    def ours():
        keys, values = cache()
        return own.attend_one_query(query, keys, values, mask)

    return best_of_alternating(
        [spelled_out, ours], per_round=copies
    ), 2 * rows * heads * positions * width * 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, torch.get_num_threads()])
    add_json_option(parser, "cpu_products.json")
    args = parser.parse_args()
    own = kernels()
    if own is None:
        parser.error("our CPU kernels do not build here (no C compiler, or no AVX2 and FMA)")
    load = OtherLoad()
    results, table = [], []
    for threads in dict.fromkeys(args.threads):
        torch.set_num_threads(threads)
        for rows in args.rows:
            measured = [("bf16", name, *bf16_pair(out, inp, rows, own)) for name, out, inp in SHAPES]
            measured += [("int4", name, *int4_pair(out, inp, rows, own)) for name, out, inp in SHAPES[:-1]]
            measured.append(("attention", "300 positions", *attention_pair(rows, own)))
            for kind, name, (theirs, ours), nbytes in measured:
                results.append(
                    {
                        "kind": kind,
                        "product": name,
                        "rows": rows,
                        "threads": threads,
                        "pytorch_s": theirs,
                        "ours_s": ours,
                        "bytes": nbytes,
                        "ours_gb_s": nbytes / ours / 1e9,
                        "ratio": theirs / ours,
                    }
                )
                table.append(
                    [kind, name, rows, threads, theirs * 1e3, ours * 1e3, nbytes / ours / 1e9, theirs / ours]
                )
                print(f"{kind} {name} rows={rows} threads={threads}: x{theirs / ours:.2f}", flush=True)
    headers = [
        "kind",
        "product",
        "rows",
        "threads",
        "PyTorch (ms)",
        "ours (ms)",
        "ours (GB/s)",
        "PyTorch / ours",
    ]
    print(markdown_table(headers, table))
    print(f"other processes' load during the run: {load.cores():.2f} cores")
    path = json_path(args, "cpu_products.json")
    record = {
        "products": results,
        "pytorch_bf16_product": "oneDNN, its own layout" if onednn_bf16() else "F.linear",
        "int4_through_bf16_dot_products": own.bf16_dot,
        "other_load_cores": load.cores(),
    }
    save_record(path, "cpu_products", record)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
