"""Shared fixtures: the golden tiny checkpoint, rebuilt once per session from its documented rule."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

# The Triton backend's kernels run on CPU tensors under Triton's interpreter; it must be chosen
# before the kernels are defined, i.e. before qwenvl is imported
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# pytest-xdist runs the suite in one process per core (`make test`): one thread each, or each
# process's parallel regions wait on cores the others hold
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

DATA = Path(__file__).parent / "data"


def triton_runs() -> bool:
    """Whether the Triton backend's kernels can run in this session: a GPU, or the interpreter."""
    from qwenvl.decode import kernels

    return kernels.available() and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


NEEDS_TRITON = pytest.mark.skipif(not triton_runs(), reason="needs Triton (a GPU, or its interpreter on CPU)")


@pytest.fixture
def interpreter_settings():
    """Kernel settings for Triton's interpreter: it runs each program as a Python loop, so fewer
    programs and loop turns than a GPU's settings (64 rows of 64 columns a matvec program, 64 keys
    a turn and 2 programs a multiprocessor in the decode attention); any blocks show how the rows
    and keys are cut."""
    from qwenvl.decode import AttentionBlocks, KernelSettings, MatvecBlocks

    if not triton_runs():
        pytest.skip("needs Triton (a GPU, or its interpreter on CPU)")
    return KernelSettings(
        matvec_blocks=MatvecBlocks(rows=64, columns=64),
        few_queries=AttentionBlocks(keys=64, warps=2, programs_per_multiprocessor=2),
    )


GOLDEN = DATA / "golden"


@pytest.fixture(scope="session")
def golden_cases() -> dict:
    return json.loads((GOLDEN / "cases.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def golden_arrays():
    return np.load(GOLDEN / "arrays.npz")


@pytest.fixture(scope="session")
def tiny_config() -> dict:
    return json.loads((GOLDEN / "config.json").read_text())


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_config) -> Path:
    """The golden tiny checkpoint (fp32 .bin) with `images/` beside it, as the golden cases expect."""
    from qwenvl.random_checkpoint import build_checkpoint

    root = tmp_path_factory.mktemp("golden")
    seed = int((GOLDEN / "seed.txt").read_text())
    folder = build_checkpoint(tiny_config, str(root / "ckpt"), seed)
    os.symlink(DATA / "images", root / "images")
    return Path(folder)


@pytest.fixture
def in_golden_dir(tiny_checkpoint, monkeypatch) -> Path:
    """Run from the folder where the golden cases' relative `images/...` paths resolve."""
    monkeypatch.chdir(tiny_checkpoint.parent)
    return tiny_checkpoint.parent


@pytest.fixture(scope="session")
def tokenizer(tiny_checkpoint):
    from qwenvl import QwenVLTokenizer

    return QwenVLTokenizer.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    from qwenvl import QwenVLForCausalLM

    torch.set_grad_enabled(True)
    return QwenVLForCausalLM.from_pretrained(tiny_checkpoint, fp32=True)


def small_config(**overrides) -> dict:
    """A very small Qwen-VL config (fast to build) with the real vocabulary size."""
    config = json.loads((GOLDEN / "config.json").read_text())
    # output_dim stays 128: the resampler has output_dim / 128 heads
    config.update({"num_hidden_layers": 1, "intermediate_size": 256})
    config["visual"] = dict(config["visual"], width=32, heads=2, layers=1)
    config.update(overrides)
    return config
