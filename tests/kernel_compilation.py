"""Compile every Triton kernel of the decode backend for an H100 (sm_90) without a GPU.

Prints each kernel's name, the 16-byte loads in its code, its programmatic-dependent-launch
instructions (`griddepcontrol`: waits, then launches), and whether a global load comes before its
wait, all of its last variant (the one with dependent launch's instructions, EARLY).

Run by test_triton_ops in a process without TRITON_INTERPRET. The argument types are those of
a bf16 decode step of Qwen-VL's shapes; those not named are bf16 pointers, or int32 strides.
"""

from __future__ import annotations

import torch
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile

from qwenvl.decode import KernelSettings, kernels

DEFAULTS = KernelSettings()

KERNELS = {
    "_add_rms_norm_kernel": (
        {"width": "i32", "eps": "fp32"},
        [{"HAS_DELTA": True, "BLOCK": 4096, "EARLY": early} for early in (False, True)],
    ),
    "_rotary_to_cache_kernel": (
        {"cos_ptr": "*fp32", "sin_ptr": "*fp32", "position_ptr": "*i64", "heads": "i32", "head_dim": "i32",
         "rot_dim": "i32"},
        [{"HAS_LOGN": True, "BLOCK": 128, "EARLY": early} for early in (False, True)],
    ),
    "_attention_split_kernel": (
        {"position_ptr": "*i64", "part_acc_ptr": "*fp32", "part_max_ptr": "*fp32", "part_sum_ptr": "*fp32",
         "heads": "i32", "head_dim": "i32", "scale": "fp32", "query_row_stride": "i32",
         "query_head_stride": "i32"},
        # shares combined after, and the one share that writes the output itself
        [{"SPLITS": splits, "BLOCK_KEYS": DEFAULTS.few_queries.keys, "BLOCK": 128, "EARLY": early}
         for splits, early in ((6, False), (1, True))],
    ),
    "_attention_combine_kernel": (
        {"part_acc_ptr": "*fp32", "part_max_ptr": "*fp32", "part_sum_ptr": "*fp32", "head_dim": "i32"},
        [{"SPLITS": 6, "BLOCK_SPLITS": 8, "BLOCK": 128, "EARLY": early} for early in (False, True)],
    ),
    "_silu_gate_kernel": ({"width": "i32"}, [{"BLOCK": 1024, "EARLY": early} for early in (False, True)]),
    # matvec's take the rest of their constants from the default settings, at the width of "k"
    "_matvec_kernel": (
        {"n": "i32", "k": "i32"},
        [{"k": 4096, "HAS_BIAS": True, "GATED": False, "EARLY": False},
         {"k": 11008, "HAS_BIAS": False, "GATED": True, "EARLY": False, "AHEAD": False},
         {"k": 11008, "HAS_BIAS": False, "GATED": True, "EARLY": True}],
    ),
}  # fmt: skip


def default_type(arg: str) -> str:
    return "i32" if arg.endswith("_stride") else "*bf16"


def main() -> None:
    target = GPUTarget("cuda", 90, 32)
    for name, (types, cases) in KERNELS.items():
        kernel = getattr(kernels, name)
        for case in cases:
            constants = dict(case)
            options = {"enable_fp_fusion": True}  # matvec's; the others' from _launch_options
            if "k" in constants:
                config = DEFAULTS.matvec_for(constants.pop("k")).launch()
                for key, value in config.items():
                    (options if key.startswith("num_") else constants).setdefault(key, value)
            else:
                launch = kernels._launch_options(constants["BLOCK"], torch.device("cpu"), DEFAULTS)
                options = {key: launch[key] for key in ("num_warps", "enable_fp_fusion")}
            signature = {arg: types.get(arg, default_type(arg)) for arg in kernel.arg_names}
            signature.update(dict.fromkeys(constants, "constexpr"))
            # as a launch specialises them at Qwen-VL's shapes: every pointer and integer is a
            # multiple of 16 (without it, loads of two bytes instead of sixteen)
            aligned = [i for i, arg in enumerate(kernel.arg_names) if signature[arg].startswith(("*", "i"))]
            attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
            compiled = compile(ASTSource(kernel, signature, constants, attrs), target=target, options=options)
            assert compiled.asm["cubin"], name
            ptx = compiled.asm["ptx"]
        waits, launches = ptx.count("griddepcontrol.wait"), ptx.count("griddepcontrol.launch_dependents")
        load_first = "ld.global" in ptx and (
            not waits or ptx.index("ld.global") < ptx.index("griddepcontrol.wait")
        )
        print(name, ptx.count("ld.global.v4"), waits, launches, int(load_first), flush=True)


if __name__ == "__main__":
    main()
