"""Loading a checkpoint: folders and hubs, .bin and safetensors shards, dtype and device.

Parameters are created on the meta device and filled shard by shard with tensors already in the
target dtype and device, so peak host memory stays near one copy of the weights.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch

from . import compact_vocabulary, placement
from .config import QwenVLConfig
from .hub import resolve_model_folder

logger = logging.getLogger(__name__)

WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
DTYPE_NAMES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}


class CheckpointError(ValueError):
    """A checkpoint that does not match the model: missing, truncated, or with wrong keys or shapes."""


class PrecisionError(ValueError):
    """A dtype the chosen device cannot compute in."""


# -- dtype and device -------------------------------------------------------------------------------


def resolve_device(device_map: Any) -> torch.device:
    """One device: "cpu", "cuda", "cuda:N", "auto" (a GPU when there is one), a torch.device, or
    {"": device}. `load_model` also spreads a model over several (`placement`)."""
    return placement.single_device(device_map)


def _requested_dtype(flags: dict[str, bool], dtype: Any) -> torch.dtype | None:
    chosen = [name for name, on in flags.items() if on]
    if len(chosen) > 1:
        raise ValueError(f"pass at most one of bf16/fp16/fp32, got {', '.join(chosen)}")
    if chosen:
        return DTYPE_NAMES[chosen[0]]
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPE_NAMES.values():
            raise ValueError(f"dtype {dtype} is not supported; use bfloat16, float16 or float32")
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPE_NAMES:
        raise ValueError(
            f"unknown dtype {dtype!r}; use one of bf16, fp16, fp32 (or bfloat16, float16, float32)"
        )
    return DTYPE_NAMES[name]


def select_dtype(device: torch.device, requested: torch.dtype | None) -> torch.dtype:
    """SPEC 6: bf16 on a GPU that has it, else fp16 on capability >= 7, else fp32; checks explicit choices."""
    if device.type == "cuda":
        bf16_ok = torch.cuda.is_bf16_supported()
        if requested is None:
            if bf16_ok:
                return torch.bfloat16
            return torch.float16 if torch.cuda.get_device_capability(device)[0] >= 7 else torch.float32
        if requested == torch.bfloat16 and not bf16_ok:
            name = torch.cuda.get_device_name(device)
            raise PrecisionError(
                f"bf16 was requested but {name} does not support bfloat16; use fp16=True or fp32=True"
            )
        return requested
    if requested is None:
        return torch.float32
    if requested != torch.float32 and not _cpu_computes(requested):
        raise PrecisionError(
            f"{requested} matrix products do not work on this CPU with torch {torch.__version__}"
        )
    return requested


def _cpu_computes(dtype: torch.dtype) -> bool:
    try:
        a = torch.ones(4, 4, dtype=dtype)
        return bool(torch.isfinite((a @ a).float()).all())
    except RuntimeError:
        return False


# -- weight files -----------------------------------------------------------------------------------


def weight_files(folder: str) -> list[str]:
    """The checkpoint's weight files, from its index when sharded; each checked to exist (and, when
    an index names it, to lie inside `folder`)."""
    for index_name in WEIGHT_INDEXES:
        index_path = os.path.join(folder, index_name)
        if os.path.exists(index_path):
            names = sorted(set(read_weight_map(index_path).values()))
            files = [_shard_path(folder, index_path, name) for name in names]
            missing = [name for name, path in zip(names, files, strict=True) if not os.path.exists(path)]
            if missing:
                raise CheckpointError(
                    f"{index_path} lists shards that are missing from {folder}: {', '.join(missing)}"
                )
            return files
    for name in WEIGHT_FILES:
        path = os.path.join(folder, name)
        if os.path.exists(path):
            return [path]
    raise CheckpointError(
        f"no weights in {folder}: expected one of {', '.join(WEIGHT_INDEXES + WEIGHT_FILES)}"
    )


def read_weight_map(index_path: str) -> dict[str, str]:
    """A weight index's map of tensor name -> shard name, each shard name checked to be a string."""
    try:
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{index_path} is not a valid weight index: {e}") from e
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index_path} is not a valid weight index: it has no 'weight_map' object")
    for tensor, name in weight_map.items():
        if not isinstance(name, str) or not name:
            raise CheckpointError(f"{index_path} gives tensor {tensor!r} the shard {name!r}: not a file name")
    return weight_map


def _shard_path(folder: str, index_path: str, name: str) -> str:
    """`name` joined to `folder`, once it is known to name a file inside it.

    The file itself may be a link to elsewhere (a hub cache's snapshot links each file to
    `../../blobs/<hash>`): the name and the folders leading to it must stay inside `folder`, the
    link's target need not.
    """
    parts = re.split(r"[/\\]", name)
    if os.path.isabs(name) or os.path.splitdrive(name)[0] or ".." in parts:
        raise CheckpointError(f"{index_path} lists shard {name!r}: not a file name inside {folder}")
    path = os.path.join(folder, name)
    root = os.path.realpath(folder)
    if os.path.commonpath([root, os.path.realpath(os.path.dirname(path))]) != root:
        raise CheckpointError(f"{index_path} lists shard {name!r}, whose folder lies outside {folder}")
    return path


def read_shard(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of one weight file; .bin files through torch.load(weights_only, mmap)."""
    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            if not isinstance(state, dict):
                raise CheckpointError(f"{path} does not hold a state dict")
            yield from state.items()
    except CheckpointError:
        raise
    except Exception as e:  # torch and safetensors raise many types for a cut or corrupt file
        size = os.path.getsize(path) if os.path.exists(path) else 0
        raise CheckpointError(
            f"cannot read weight file {path} ({size:,} bytes): it looks truncated or corrupt "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from e


def _progress(files: list[str], show: bool | None) -> Iterator[str]:
    if show is None:
        show = len(files) > 1 and sys.stderr.isatty()
    if not show:
        yield from files
        return
    from tqdm.auto import tqdm

    yield from tqdm(files, desc="Loading checkpoint shards", unit="shard")


def _checked(name, tensor, expected, path, dtype, where: placement.Placement) -> torch.Tensor:
    """`tensor` in the target dtype, on its unit's device, once its name and shape are known to fit."""
    if name not in expected:
        raise CheckpointError(f"unexpected tensor {name!r} in {path}: this model has no such parameter")
    if tuple(tensor.shape) != expected[name]:
        raise CheckpointError(
            f"tensor {name!r} in {path} has shape {tuple(tensor.shape)}, the config implies {expected[name]}"
        )
    # copy even when dtype and device match: the source is a view of the mmap'd file, which
    # must not back a parameter (the file may be overwritten); its pages are released with the shard.
    # Integer tensors (an Int4 checkpoint's packed codes) keep their dtype.
    return tensor.to(where.device_of(name), dtype=dtype if tensor.is_floating_point() else None, copy=True)


def load_weights(
    model: torch.nn.Module,
    files: list[str],
    dtype: torch.dtype,
    where: placement.Placement,
    show_progress: bool | None = None,
) -> None:
    """Fill a meta-device model from weight files, each tensor on its unit's device (`where`);
    every key and shape is checked."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    optional = {"lm_head.weight"} if tied else set()
    seen: dict[str, str] = {}
    for path in _progress(files, show_progress):
        part, vocabulary = {}, {}
        for name, tensor in read_shard(path):
            if name in compact_vocabulary.VOCABULARY_TENSORS or name == compact_vocabulary.KEPT_IDS:
                vocabulary[name] = tensor  # a compact checkpoint's are expanded once all are read
                continue
            part[name] = _checked(name, tensor, expected, path, dtype, where)
        try:
            vocabulary = compact_vocabulary.expand(vocabulary, model.config.vocab_size)
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from e
        for name, tensor in vocabulary.items():
            part[name] = _checked(name, tensor, expected, path, dtype, where)
        seen.update(dict.fromkeys(part, path))
        model.load_state_dict(part, strict=False, assign=True)
        del part, vocabulary
    missing = sorted(set(expected) - set(seen) - optional)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"the checkpoint in {os.path.dirname(files[0])} lacks {shown}")
    if tied:
        model.lm_head.weight = model.transformer.wte.weight


# -- the entry point --------------------------------------------------------------------------------


def load_config(folder: str) -> QwenVLConfig:
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        raise CheckpointError(f"{folder} has no config.json")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    if data.get("model_type") != "qwen" or "visual" not in data:
        raise CheckpointError(f"{path} is not a Qwen-VL config (model_type {data.get('model_type')!r})")
    config = QwenVLConfig.from_dict(data)
    try:
        config.check()
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from e
    return config


def load_generation_config(folder: str):
    from transformers import GenerationConfig

    from .chat_format import CHAT_GENERATION_DEFAULTS

    if os.path.exists(os.path.join(folder, "generation_config.json")):
        return GenerationConfig.from_pretrained(folder)
    return GenerationConfig(**CHAT_GENERATION_DEFAULTS)


def _placed(model, device_map: Any, max_memory: dict | None, dtype: torch.dtype) -> placement.Placement:
    """Where `device_map` puts each part of the meta-device `model`, each device checked to compute
    in `dtype` (chosen for the first device)."""
    where = placement.place(model, device_map, dtype, max_memory)
    for device in where.devices:
        select_dtype(device, dtype)
    if where.spread:
        logger.info("the model spreads over %d devices:\n%s", len(where.devices), where.describe())
        if torch.device("cpu") in where.devices:
            logger.warning("part of the model computes on the CPU: its layers are the slow part of each step")
    return where


def load_model(
    name_or_path: str | os.PathLike,
    *,
    model_class: Callable | None = None,
    bf16: bool = False,
    fp16: bool = False,
    fp32: bool = False,
    dtype: Any = None,
    torch_dtype: Any = None,
    device_map: Any = "cpu",
    max_memory: dict | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
    config: QwenVLConfig | None = None,
    show_progress: bool | None = None,
    **ignored: Any,
):
    """A QwenVLForCausalLM from a folder or hub id, in eval mode.

    Precision: at most one of bf16/fp16/fp32, or dtype/torch_dtype; none picks per SPEC 6 (for
    the first device the model goes on). `device_map`: one device, "auto", "balanced",
    "balanced_low_0", "sequential" or a dict of module name -> device, bounded by `max_memory`
    ({0: "12GiB", "cpu": "64GiB"}): see `qwenvl.placement`.
    Unknown keyword arguments (trust_remote_code, low_cpu_mem_usage, ...) are accepted and ignored.
    """
    from .modeling import QwenVLForCausalLM

    model_class = model_class or QwenVLForCausalLM
    if ignored:
        logger.debug("from_pretrained ignores %s", ", ".join(sorted(ignored)))
    folder = resolve_model_folder(
        name_or_path, revision=revision, cache_dir=cache_dir, token=token, local_files_only=local_files_only
    )
    config = config if isinstance(config, QwenVLConfig) else load_config(folder)
    first = placement.first_device(device_map, max_memory)
    requested = _requested_dtype({"bf16": bf16, "fp16": fp16, "fp32": fp32}, dtype or torch_dtype)
    if requested is None:
        requested = _requested_dtype(
            {k: bool(getattr(config, k, False)) for k in ("bf16", "fp16", "fp32")}, None
        )
    target = select_dtype(first, requested)
    files = weight_files(folder)
    with torch.device("meta"):
        model = model_class(config)
    from .int4 import checkpoint as int4_checkpoint

    quantized = int4_checkpoint.prepare(model, folder, files)  # GPTQ layers, where the folder has them
    where = _placed(model, device_map, max_memory, target)
    load_weights(model, files, target, where, show_progress)
    if quantized:
        int4_checkpoint.check_loaded(model)
    model.generation_config = load_generation_config(folder)
    model.name_or_path = os.fspath(name_or_path)
    logger.info("loaded %s (%s on %s)", name_or_path, target, ", ".join(map(str, where.devices)))
    return model.eval()


# -- saving -----------------------------------------------------------------------------------------

# Every weight file name either layout can have; the ones a new save does not rewrite are removed,
# because weight_files() would otherwise prefer a stale index over the fresh weights.
STALE_WEIGHT_PATTERNS = (
    r"model\.safetensors(\.index\.json)?",
    r"model-\d{5}-of-\d{5}\.safetensors",
    r"pytorch_model\.bin(\.index\.json)?",
    r"pytorch_model-\d{5}-of-\d{5}\.bin",
)


def save_model(
    model, folder: str | os.PathLike, *, max_shard_size: int = 4 * 2**30, **ignored: Any
) -> list[str]:
    """Write config, generation config and safetensors weights (sharded past `max_shard_size` bytes).

    The tokenizer is saved by its own save_pretrained. Returns the paths written.
    """
    if ignored:
        logger.debug("save_pretrained ignores %s", ", ".join(sorted(ignored)))
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    state = _state_to_save(model)
    written = [_write_config(model, folder, _weights_dtype(state))]
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
        written.append(os.path.join(folder, "generation_config.json"))
    written += _write_safetensors(state, folder, max_shard_size)
    _remove_stale_weights(folder, keep=written)
    logger.info("saved %d tensors to %s", len(state), folder)
    return written


def _state_to_save(model) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        # safetensors refuses two names for one storage; loading re-ties lm_head to wte
        lm_head = state.pop("lm_head.weight", None)
        wte = state["transformer.wte.weight"]
        if lm_head is not None and lm_head is not wte and not torch.equal(lm_head, wte):
            logger.warning("tie_word_embeddings is set but lm_head differs from wte: only wte is saved")
    return state


def _weights_dtype(state: dict[str, torch.Tensor]) -> torch.dtype:
    return next(iter(state.values())).dtype


def _write_config(model, folder: str, dtype: torch.dtype) -> str:
    """config.json in the official shape: model_type "qwen", the `visual` block, no remote-code auto_map."""
    data = model.config.to_diff_dict()
    data.pop("auto_map", None)
    data["architectures"] = ["QWenLMHeadModel"]
    data["dtype"] = str(dtype).removeprefix("torch.")
    path = os.path.join(folder, "config.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
    return path


def shard_names(state: dict[str, torch.Tensor], max_shard_size: int) -> list[list[str]]:
    """Names grouped in sorted order into shards of at most `max_shard_size` bytes (a bigger tensor alone)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name in sorted(state):
        nbytes = state[name].numel() * state[name].element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _write_safetensors(state: dict[str, torch.Tensor], folder: str, max_shard_size: int) -> list[str]:
    from safetensors.torch import save_file

    shards = shard_names(state, max_shard_size)
    count = len(shards)
    weight_map: dict[str, str] = {}
    written = []
    for k, names in enumerate(shards, 1):
        filename = "model.safetensors" if count == 1 else f"model-{k:05d}-of-{count:05d}.safetensors"
        # one shard at a time on the host, so saving from a GPU needs one shard of host memory
        part = {name: state[name].detach().to("cpu").contiguous() for name in names}
        path = os.path.join(folder, filename)
        save_file(part, path, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, filename))
        written.append(path)
    if count > 1:
        total = sum(t.numel() * t.element_size() for t in state.values())
        path = os.path.join(folder, "model.safetensors.index.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        written.append(path)
    return written


def _remove_stale_weights(folder: str, keep: list[str]) -> None:
    kept = {os.path.basename(path) for path in keep}
    for name in os.listdir(folder):
        if name not in kept and any(re.fullmatch(p, name) for p in STALE_WEIGHT_PATTERNS):
            logger.info("removing %s, left from an earlier save", os.path.join(folder, name))
            os.remove(os.path.join(folder, name))
