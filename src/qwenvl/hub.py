"""Turn a model name into a local folder: a folder as is, else the Hugging Face or ModelScope cache.

Everything downstream (tokenizer, config, weights) reads plain files from the folder this returns,
so the network is touched in exactly one place.
"""

from __future__ import annotations

import os

MODELSCOPE_PREFIX = "modelscope:"

# What a Qwen-VL folder needs; the remote-code .py files and SimSun.ttf are left behind.
MODEL_FILE_PATTERNS = ("*.json", "*.tiktoken", "*.bin", "*.safetensors")
TOKENIZER_FILE_PATTERNS = ("tokenizer_config.json", "config.json", "*.tiktoken")


class ModelNotFoundError(OSError):
    """A model name that is neither a folder nor resolvable through a hub or its cache."""


def resolve_model_folder(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
    patterns: tuple[str, ...] = MODEL_FILE_PATTERNS,
) -> str:
    """The local folder holding `name_or_path`'s files, downloading only what `patterns` match."""
    name = os.fspath(name_or_path)
    if os.path.isdir(name):
        return name
    if name.startswith(MODELSCOPE_PREFIX):
        return _from_modelscope(name[len(MODELSCOPE_PREFIX) :], revision, cache_dir, patterns)
    if os.path.exists(name) or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelNotFoundError(f"model folder {name!r} does not exist (or is not a folder)")
    return _from_huggingface(name, revision, cache_dir, token, local_files_only, patterns)


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as set now; huggingface_hub reads it only at import."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return constants.HF_HUB_OFFLINE or value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _from_huggingface(repo_id, revision, cache_dir, token, local_files_only, patterns) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    # also honours HF_HUB_OFFLINE set after huggingface_hub was imported (e.g. in a notebook)
    local_files_only = local_files_only or hub_offline()
    try:
        return snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache_dir,
            token=token,
            local_files_only=local_files_only,
            allow_patterns=list(patterns),
        )
    except HFValidationError as e:
        raise ModelNotFoundError(f"{repo_id!r} is neither a local folder nor a valid hub id: {e}") from e
    except Exception as e:  # offline, missing from cache, gated, revision unknown: one message
        where = "the local Hugging Face cache" if local_files_only else "the Hugging Face hub or its cache"
        raise ModelNotFoundError(
            f"could not find model {repo_id!r} (revision {revision or 'main'}) in {where}: "
            f"{type(e).__name__}: {e}"
        ) from e


def _from_modelscope(model_id, revision, cache_dir, patterns) -> str:
    try:
        from modelscope import snapshot_download
    except ImportError as e:
        raise ModelNotFoundError(
            f"{MODELSCOPE_PREFIX}{model_id} needs the `modelscope` package: pip install modelscope"
        ) from e
    try:
        return snapshot_download(
            model_id,
            revision=revision or "master",
            cache_dir=cache_dir,
            allow_patterns=list(patterns),
        )
    except Exception as e:
        raise ModelNotFoundError(
            f"could not get {model_id!r} from ModelScope: {type(e).__name__}: {e}"
        ) from e
