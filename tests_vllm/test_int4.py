"""Int4 (GPTQ) folders, as qwenvl's quantizer writes them (the official Int4 layout), through vLLM."""

from __future__ import annotations

import pytest

pytest.importorskip(
    "vllm", reason="the vLLM plugin's tests need vLLM: `make venv-vllm` builds its environment"
)


def four_bit_kernel() -> bool:
    import torch
    from vllm.platforms import current_platform

    current_platform.import_kernels()
    return not current_platform.is_cpu() or hasattr(torch.ops._C, "cpu_gemm_wna16")


def test_where_vllm_has_no_four_bit_kernel_the_folder_is_refused_by_name(checkpoint, tmp_path):
    import torch
    from vllm import LLM

    from qwenvl.int4 import quantize_folder

    if four_bit_kernel():
        pytest.skip("this vLLM has its 4-bit kernel: Int4 replies come in bf16, not compared here")
    folder = tmp_path / "int4"
    assert quantize_folder(str(checkpoint), str(folder), dtype=torch.bfloat16) > 0
    with pytest.raises(Exception, match="cpu_gemm_wna16") as refused:
        LLM(model=str(folder), dtype="bfloat16", max_model_len=1024, kv_cache_memory_bytes=64 * 2**20)
    assert "Int4" in str(refused.value)
