"""Where each part of a model lives when `device_map` spreads it over several devices.

A model is placed in units that each stay whole on one device: the vision tower, the token
embedding, each transformer block, the final norm and the LM head (`unit_of` names the unit of a
tensor). The forward moves the hidden state to each block's device as it reaches it
(`model.qwenvl`), each layer's keys and values live on its block's device (`cache.KVCache`), and
the logits come out on the LM head's device.

`device_map` takes what transformers' `from_pretrained` takes:

- one device: "cpu", "cuda", "cuda:1", 1, a torch.device, or {"": device};
- a strategy: "sequential" fills each device in turn; "balanced" gives each GPU about the same
  share; "balanced_low_0" leaves GPU 0 as empty as it can; "auto" keeps the model on the first
  GPU where it fits there (a model on one device decodes through CUDA graphs and the Triton
  kernels, a spread one through plain PyTorch), else balances it;
- a dict of module name -> device, names at any depth ("transformer.h.3", "transformer",
  "lm_head"); the longest name that holds a tensor decides its device, "" covers the rest.

`max_memory` ({0: "12GiB", 1: "12GiB", "cpu": "64GiB"}) names the devices a strategy may fill
and the bytes of weights each may take. Without it, each visible GPU offers `GPU_SHARE` of its
free memory and the CPU its available memory. A plan counts the weights only: the KV cache and
the activations need the rest. A unit placed on the CPU computes there (accelerate would stream
its weights to a GPU for each forward instead); offloading to "disk" or "meta" is refused.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
# modules of the original implementation that hold no weights: maps written for it may name them
WEIGHTLESS_MODULES = ("transformer.drop", "transformer.rotary_emb")
# of a GPU's free memory, what a plan made without max_memory fills with weights: the rest is
# left to the KV cache and the activations
GPU_SHARE = 0.9
# the image features are written into the embeddings: the tower goes where the embedding is
FIRST_UNITS = ("transformer.visual", "transformer.wte")
# the logits need both
LAST_UNITS = ("transformer.ln_f", "lm_head")
MEMORY_UNITS = {
    "": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip


class PlacementError(ValueError):
    """A device_map or max_memory that cannot place the model."""


@dataclass(frozen=True)
class Placement:
    """The device of every unit of a model, in the order the forward meets them."""

    units: dict[str, torch.device]

    def device_of(self, name: str) -> torch.device:
        """The device of the tensor `name` (a state-dict key)."""
        return self.units[unit_of(name)]

    @property
    def devices(self) -> list[torch.device]:
        """The devices used, in the order the forward meets them."""
        return list(dict.fromkeys(self.units.values()))

    @property
    def spread(self) -> bool:
        return len(self.devices) > 1

    def describe(self) -> str:
        """Which units each device holds, a line each (runs of blocks as "transformer.h.0-11")."""
        return "\n".join(
            f"{device}: {', '.join(_runs([n for n, d in self.units.items() if d == device]))}"
            for device in self.devices
        )


def _runs(names: list[str]) -> list[str]:
    """`names` with each run of consecutive blocks written as one range."""
    runs: list[list] = []  # [name, first block, last block]
    for name in names:
        index = int(name.rsplit(".", 1)[1]) if name.startswith("transformer.h.") else None
        if index is not None and runs and runs[-1][2] == index - 1:
            runs[-1][2] = index
        else:
            runs.append([name, index, index])
    return [name if first == last else f"transformer.h.{first}-{last}" for name, first, last in runs]


# -- the units of a model ---------------------------------------------------------------------------


def units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The units of a `QwenVLForCausalLM`, in the order the forward meets them."""
    transformer = model.transformer
    return [
        ("transformer.visual", transformer.visual),
        ("transformer.wte", transformer.wte),
        *((f"transformer.h.{i}", block) for i, block in enumerate(transformer.h)),
        ("transformer.ln_f", transformer.ln_f),
        ("lm_head", model.lm_head),
    ]


def unit_of(name: str) -> str:
    """The unit that holds the module or tensor `name`: "transformer.h.3" for a block's,
    "transformer.wte" for another part of the transformer's, "lm_head" for the head's."""
    parts = name.split(".")
    depth = 1 if parts[0] != "transformer" else 3 if parts[1:2] == ["h"] else 2
    return ".".join(parts[:depth])


def module_device(module: nn.Module) -> torch.device:
    """Where a unit's tensors are (its first parameter or buffer)."""
    return next(itertools.chain(module.parameters(), module.buffers())).device


def layer_devices(model: nn.Module) -> list[torch.device]:
    """The device of each transformer block: where its keys and values belong in a KV cache."""
    return [module_device(block) for block in model.transformer.h]


def model_devices(model: nn.Module) -> list[torch.device]:
    """The devices a loaded model's units are on, in the order the forward meets them."""
    return list(dict.fromkeys(module_device(module) for _, module in units(model)))


def unit_sizes(model: nn.Module, dtype: torch.dtype) -> dict[str, int]:
    """Bytes of each unit with its floating tensors in `dtype` (integer ones, such as packed 4-bit
    weights, keep theirs). A tensor two units share (tied embeddings) counts in the first."""
    seen: set[int] = set()
    sizes = {}
    for name, module in units(model):
        size = 0
        for tensor in itertools.chain(module.parameters(), module.buffers()):
            if id(tensor) not in seen:
                seen.add(id(tensor))
                width = dtype.itemsize if tensor.is_floating_point() else tensor.element_size()
                size += tensor.numel() * width
        sizes[name] = size
    return sizes


def placement_groups(sizes: Mapping[str, int]) -> list[tuple[tuple[str, ...], int]]:
    """The units as a plan moves them: the vision tower with the embedding, each block alone, the
    final norm with the LM head; with their bytes."""
    middle = [name for name in sizes if name not in FIRST_UNITS + LAST_UNITS]
    return [
        (FIRST_UNITS, sum(sizes[name] for name in FIRST_UNITS)),
        *(((name,), sizes[name]) for name in middle),
        (LAST_UNITS, sum(sizes[name] for name in LAST_UNITS)),
    ]


# -- devices and sizes as users write them ------------------------------------------------------------


def parse_device(value: Any, what: str = "device_map") -> torch.device:
    """One device as a map names it: an int (a GPU's index), "cpu", "cuda", "cuda:N" or a
    torch.device; checked to exist. `what`: where it was written, for the errors."""
    if isinstance(value, str) and value in ("disk", "meta"):
        raise PlacementError(
            f"{what}={value!r}: offloading to {value!r} is not supported; give every module a GPU or 'cpu'"
        )
    if isinstance(value, bool) or not isinstance(value, (int, str, torch.device)):
        raise PlacementError(f"{what}={value!r} is not a device (an int, 'cpu', 'cuda:N' or a torch.device)")
    try:
        device = torch.device("cuda", value) if isinstance(value, int) else torch.device(value)
    except (RuntimeError, ValueError) as e:
        raise PlacementError(f"{what}={value!r} is not a device: {e}") from e
    if device.type == "meta":
        raise PlacementError(f"{what}={value!r}: the meta device holds no weights; give a GPU or 'cpu'")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise PlacementError(f"{what}={value!r} asks for CUDA, but no CUDA device is available")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise PlacementError(f"{what}={value!r}: there are {count} CUDA devices (0 to {count - 1})")
    return device


def parse_memory(value: Any, what: str = "max_memory") -> int:
    """Bytes, given as an int or a string such as "12GiB", "500MB" or "1.5 GB"."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([kmgt]i?b|b)?\s*", str(value), re.IGNORECASE)
    if isinstance(value, bool) or not isinstance(value, (int, str)) or match is None:
        raise PlacementError(
            f"{what}={value!r} is not a size: give bytes, or a string such as '12GiB' or '500MB'"
        )
    return int(float(match[1]) * MEMORY_UNITS[(match[2] or "").lower()])


def _indexed(device: torch.device) -> torch.device:
    """A GPU named without an index ("cuda") as the one it means, so that maps compare devices."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _fill_order(device: torch.device) -> tuple[int, int]:
    """GPUs by index, then other accelerators, then the CPU."""
    rank = 0 if device.type == "cuda" else 2 if device.type == "cpu" else 1
    return rank, device.index or 0


def memory_budgets(max_memory: Mapping | None = None) -> dict[torch.device, int]:
    """Bytes of weights each device may take, in the order a plan fills them: `max_memory`'s
    devices, else every visible GPU (`GPU_SHARE` of its free memory) and the CPU (its available
    memory)."""
    if max_memory is None:
        from .decode.cpu_ops import free_memory

        budgets = {
            torch.device("cuda", i): int(GPU_SHARE * torch.cuda.mem_get_info(i)[0])
            for i in range(torch.cuda.device_count())
        }
        host = free_memory()
        if host:  # 0: the system does not tell
            budgets[torch.device("cpu")] = host
        return budgets
    if not isinstance(max_memory, Mapping) or not max_memory:
        raise PlacementError(
            f"max_memory={max_memory!r}: give a dict of device -> bytes, e.g. {{0: '12GiB'}}"
        )
    budgets = {}
    for key, size in max_memory.items():
        device = _indexed(parse_device(key, "max_memory key"))
        budgets[device] = parse_memory(size, f"max_memory[{key!r}]")
    return dict(sorted(budgets.items(), key=lambda item: _fill_order(item[0])))


# -- plans --------------------------------------------------------------------------------------------


def plan(
    groups: Sequence[tuple[Sequence[str], int]],
    budgets: Mapping[torch.device, int],
    strategy: str = "balanced",
) -> dict[str, torch.device]:
    """Each group of units (names, bytes), in order, on a device: on the current one while what it
    holds stays within its budget, else on the next. `groups`: as `placement_groups` gives them.
    `budgets`: the devices in the order to fill (`memory_budgets`).

    "balanced": every GPU but the last takes at most an even share of the model, plus a block so
    that whole blocks reach the share; "balanced_low_0": GPU 0 takes only what the other GPUs
    cannot hold (plus a block); "sequential": each device takes what fits. "auto": the first GPU
    alone where it holds the whole model (its steps then replay as CUDA graphs), else "balanced".
    """
    if strategy == "auto":
        first = next((device for device, size in budgets.items() if size > 0), None)
        if first is not None and first.type == "cuda" and sum(size for _, size in groups) <= budgets[first]:
            return {name: first for names, _ in groups for name in names}
        strategy = "balanced"
    caps = _capped(groups, budgets, strategy)
    devices = [device for device, cap in caps.items() if cap > 0]
    placed: dict[str, torch.device] = {}
    at, used = 0, 0
    for index, (names, size) in enumerate(groups):
        while at < len(devices) and used + size > caps[devices[at]]:
            at, used = at + 1, 0
        if at == len(devices):
            raise PlacementError(_no_room(groups, index, budgets))
        placed.update(dict.fromkeys(names, devices[at]))
        used += size
    return placed


def _capped(
    groups: Sequence[tuple[Sequence[str], int]], budgets: Mapping[torch.device, int], strategy: str
) -> dict[torch.device, int]:
    if strategy not in STRATEGIES:
        raise PlacementError(f"unknown device_map strategy {strategy!r}; expected one of {STRATEGIES}")
    caps = dict(budgets)
    gpus = [device for device, size in caps.items() if device.type == "cuda" and size > 0]
    if strategy == "sequential" or len(gpus) < 2:
        return caps
    total = sum(size for _, size in groups)
    block = max(size for _, size in (groups[1:-1] or groups))
    if strategy == "balanced":
        for gpu in gpus[:-1]:
            caps[gpu] = min(caps[gpu], -(-total // len(gpus)) + block)
        return caps
    for gpu in gpus[1:-1]:
        caps[gpu] = min(caps[gpu], -(-total // (len(gpus) - 1)) + block)
    others = sum(caps[gpu] for gpu in gpus[1:])
    caps[gpus[0]] = min(caps[gpus[0]], max(0, total - others) + block)
    return caps


def _gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB"


def _no_room(
    groups: Sequence[tuple[Sequence[str], int]], index: int, budgets: Mapping[torch.device, int]
) -> str:
    left = sum(size for _, size in groups[index:])
    total = sum(size for _, size in groups)
    offered = ", ".join(f"{device}: {_gib(size)}" for device, size in budgets.items()) or "no device"
    return (
        f"the model's weights ({_gib(total)}) do not fit in the memory offered ({offered}): "
        f"{groups[index][0][0]} and what follows it ({_gib(left)}) find no room; "
        "give max_memory more bytes or more devices"
    )


# -- from a device_map --------------------------------------------------------------------------------


def single_device(device_map: Any) -> torch.device:
    """The device of a map that names one: "cpu", "cuda:N", N, a torch.device, {"": device}, or a
    strategy ("auto": a GPU when there is one, else the CPU); a map over several is refused."""
    if isinstance(device_map, Mapping):
        values = set(device_map.values())
        if len(values) != 1:
            raise PlacementError(
                f"device_map {device_map!r} names {len(values)} devices where one device is expected"
            )
        device_map = values.pop()
    if device_map is None or (isinstance(device_map, str) and device_map in STRATEGIES):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return parse_device(device_map)


def _is_spreading_map(device_map: Any) -> bool:
    return isinstance(device_map, Mapping) and set(device_map) != {""}


def _is_plan(device_map: Any, max_memory: Mapping | None) -> bool:
    """A strategy with devices to fill: GPUs, or max_memory's (without either: the CPU alone)."""
    is_strategy = isinstance(device_map, str) and device_map in STRATEGIES
    return is_strategy and (max_memory is not None or torch.cuda.is_available())


def first_device(device_map: Any, max_memory: Mapping | None = None) -> torch.device:
    """The first device `device_map` may put weights on, a GPU before the CPU: the one a model's
    default dtype is chosen for."""
    if _is_spreading_map(device_map):
        devices = [_indexed(parse_device(value, f"device_map[{key!r}]")) for key, value in device_map.items()]
    elif _is_plan(device_map, max_memory):
        devices = [device for device, size in memory_budgets(max_memory).items() if size > 0]
    else:
        return single_device(device_map)
    return min(devices, key=_fill_order) if devices else torch.device("cpu")


def place(
    model: nn.Module, device_map: Any, dtype: torch.dtype, max_memory: Mapping | None = None
) -> Placement:
    """Where `device_map` puts each unit of `model` (on the meta device: only shapes are read)
    whose floating weights will be in `dtype`; `max_memory` bounds a strategy's plan."""
    names = [name for name, _ in units(model)]
    if _is_spreading_map(device_map):
        placed = _from_dict(model, device_map)
    elif _is_plan(device_map, max_memory):
        placed = plan(placement_groups(unit_sizes(model, dtype)), memory_budgets(max_memory), device_map)
        if _tied(model):  # the head's weight is the embedding's
            placed["lm_head"] = placed["transformer.wte"]
    else:
        placed = dict.fromkeys(names, single_device(device_map))
    return Placement({name: placed[name] for name in names})


def _tied(model: nn.Module) -> bool:
    return model.lm_head.weight is model.transformer.wte.weight


def _from_dict(model: nn.Module, device_map: Mapping) -> dict[str, torch.device]:
    """Each unit's device under a map of module names; refused where the map names what the model
    lacks, leaves tensors unplaced, or puts parts of one unit on several devices."""
    asked = {
        str(key): _indexed(parse_device(value, f"device_map[{key!r}]")) for key, value in device_map.items()
    }
    keys = list(model.state_dict())
    strange = [
        name
        for name in asked
        if name
        and name not in WEIGHTLESS_MODULES
        and not any(k == name or k.startswith(name + ".") for k in keys)
    ]
    if strange:
        raise PlacementError(
            f"device_map names {', '.join(map(repr, strange))}: this model has no such module"
        )
    found: dict[str, set[torch.device]] = {name: set() for name, _ in units(model)}
    unplaced = []
    for key in keys:
        parts = key.split(".")
        prefix = next(
            (p for p in (".".join(parts[:n]) for n in range(len(parts), -1, -1)) if p in asked), None
        )
        if prefix is None:
            unplaced.append(key)
        else:
            found[unit_of(key)].add(asked[prefix])
    if unplaced:
        shown = ", ".join(unplaced[:3]) + (f" and {len(unplaced) - 3} more" if len(unplaced) > 3 else "")
        raise PlacementError(f"device_map leaves {shown} unplaced: name every module, or give '' the rest")
    for name, devices in found.items():
        if len(devices) > 1:
            listed = " and ".join(sorted(map(str, devices)))
            raise PlacementError(
                f"device_map puts parts of {name} on {listed}: it must stay whole on one device"
            )
    placed = {name: devices.pop() for name, devices in found.items()}
    if _tied(model) and placed["lm_head"] != placed["transformer.wte"]:
        raise PlacementError(
            "device_map puts lm_head and transformer.wte on different devices, but they share one "
            "weight (tie_word_embeddings)"
        )
    return placed
