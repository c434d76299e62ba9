"""The Triton kernels' settings as data: a frozen object the kernels are given, per-device files.

Every choice that changes how fast (never what) a decode step's kernels compute lives here:
whether one-row products and one-query attention take the Triton kernels at all, whether the
kernels launch early on Hopper, and their blocks. The defaults are the quickest measured on an
H200 (benchmarks/results/gpu.md); `KernelSettings.for_device` reads the tuned values of a GPU
from `configs/<device name>.json` in this package where there is one (as vLLM ships its tuned
kernel configs), and `python -m benchmarks.tuned` writes such a file from a profile.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

CONFIGS = Path(__file__).parent / "configs"


@dataclass(frozen=True)
class MatvecBlocks:
    """How `kernels.matvec` reads a weight: `rows` output rows a program, `columns` a loop turn,
    the next tile read a turn ahead (`ahead`). A row's sums depend on these alone, never on the
    matrix it is part of, so a row has the same bits in w1 alone and in w1 and w2 packed."""

    rows: int = 4
    columns: int = 1024
    warps: int = 4
    stages: int = 3
    ahead: bool = True

    def launch(self) -> dict:
        """The kernel's launch arguments."""
        return {
            "BLOCK_N": self.rows,
            "BLOCK_K": self.columns,
            "num_warps": self.warps,
            "num_stages": self.stages,
            "AHEAD": self.ahead,
        }


@dataclass(frozen=True)
class AttentionBlocks:
    """How `kernels.decode_attention` reads a row's keys: `keys` a loop turn in `warps` warps, and
    enough shares of each row's keys for `programs_per_multiprocessor` programs on each
    multiprocessor (flash decoding)."""

    keys: int
    warps: int
    programs_per_multiprocessor: int


@dataclass(frozen=True)
class KernelSettings:
    """What the Triton backend (`triton_ops.TritonOps`) and its kernels do on one device.

    - `matvec`: a decode step's one-row products through `kernels.matvec` (False: cuBLAS);
    - `flash_decoding`: one-query attention over the cache through `kernels.decode_attention`
      (False: SDPA);
    - `dependent_launch`: on Hopper and later, each kernel launches while the one before it ends
      and waits for it before reading what it wrote (programmatic dependent launch);
    - `matvec_blocks` (and per input width, `matvec_blocks_by_width`);
    - the decode attention's blocks for steps of fewer queries (rows x heads) than the device has
      multiprocessors (`few_queries`: batch 1 to 4 of Qwen-VL on an H200), and of more.
    """

    matvec: bool = True
    flash_decoding: bool = True
    dependent_launch: bool = True
    matvec_blocks: MatvecBlocks = MatvecBlocks()
    matvec_blocks_by_width: tuple[tuple[int, MatvecBlocks], ...] = ()
    few_queries: AttentionBlocks = AttentionBlocks(keys=16, warps=2, programs_per_multiprocessor=8)
    many_queries: AttentionBlocks = AttentionBlocks(keys=64, warps=4, programs_per_multiprocessor=2)

    def matvec_for(self, width: int) -> MatvecBlocks:
        """The blocks of products whose rows are `width` long."""
        return dict(self.matvec_blocks_by_width).get(width, self.matvec_blocks)

    def attention_for(self, queries: int, multiprocessors: int) -> tuple[AttentionBlocks, int]:
        """The blocks of a decode attention of `queries`, and the shares of each row's keys.

        One program per query leaves most of an H100 idle at batch 1 (32 programs for 132
        multiprocessors, each walking the whole context alone); shares fill it, and a big batch
        needs none. Neither depends on the rows' lengths or the cache's capacity, so a row's keys
        are read alike in a graphed step, an eager one, and a batch of as many rows.
        """
        blocks = self.many_queries if queries >= multiprocessors else self.few_queries
        return blocks, max(1, -(-blocks.programs_per_multiprocessor * multiprocessors // queries))

    # -- as data ----------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["matvec_blocks_by_width"] = {str(w): asdict(b) for w, b in self.matvec_blocks_by_width}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KernelSettings:
        """Settings from `to_dict`'s form; keys left out keep their defaults, unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown kernel settings: {', '.join(sorted(unknown))}")
        values: dict[str, Any] = {}
        for name, value in data.items():
            if name == "matvec_blocks":
                value = MatvecBlocks(**value)
            elif name == "matvec_blocks_by_width":
                value = tuple(sorted((int(w), MatvecBlocks(**b)) for w, b in value.items()))
            elif name in ("few_queries", "many_queries"):
                value = AttentionBlocks(**value)
            values[name] = value
        return cls(**values)

    def with_changes(self, **changes: Any) -> KernelSettings:
        return replace(self, **changes)

    @classmethod
    def for_device(cls, device: torch.device | str) -> KernelSettings:
        """The tuned settings of `device`'s kind (`configs/<name>.json`), else the defaults."""
        device = torch.device(device)
        if device.type != "cuda":
            return cls()
        path = config_path(torch.cuda.get_device_name(device))
        return cls.load(path) if path.exists() else cls()

    @classmethod
    def load(cls, path: str | Path) -> KernelSettings:
        try:
            return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError) as error:
            raise ValueError(f"cannot read kernel settings from {path}: {error}") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")


def config_path(device_name: str) -> Path:
    """Where the package keeps the tuned settings of a device named `device_name`."""
    return CONFIGS / (re.sub(r"[^A-Za-z0-9]+", "_", device_name).strip("_") + ".json")
