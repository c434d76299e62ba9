"""What every front end (CLI, server, web demo) shares: model options and loading them."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

MODEL_ENV = "QWENVL_MODEL"


class MissingExtraError(Exception):
    """A command's optional module or one of its dependencies is not installed."""


def missing_extra(command: str, extra: str, module: str) -> MissingExtraError:
    """The error of `qwenvl COMMAND` when `module`, which its install `extra` brings, is missing."""
    return MissingExtraError(
        f"qwenvl {command} needs the {extra} extra (cannot import {module}): pip install 'qwenvl[{extra}]'"
    )


def require_extra(command: str, extra: str, module: str) -> None:
    """Import `module` now, or fail with the MissingExtraError that names the extra to install."""
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as error:
        raise missing_extra(command, extra, error.name or module) from error


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model, precision and device flags."""
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        default=os.environ.get(MODEL_ENV),
        help=f"model folder or hub id (default: ${MODEL_ENV}, else the bundled demo model)",
    )
    precision = group.add_mutually_exclusive_group()
    for name in ("bf16", "fp16", "fp32"):
        precision.add_argument(f"--{name}", action="store_true", help=f"compute in {name}")
    group.add_argument("--device", default="auto", help='"cpu", "cuda", "cuda:N" or "auto" (default)')
    group.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    group.add_argument("--offline", action="store_true", help="only use files already on this machine")


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("generation")
    group.add_argument(
        "--system", default=None, help="system prompt (default: 'You are a helpful assistant.')"
    )
    group.add_argument("--max-new-tokens", type=int, default=None)
    group.add_argument("--temperature", type=float, default=None)
    group.add_argument("--top-p", type=float, default=None)
    group.add_argument("--top-k", type=int, default=None)
    group.add_argument("--repetition-penalty", type=float, default=None)
    group.add_argument("--greedy", action="store_true", help="greedy decoding (no sampling)")
    group.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    from .decode.sampling import DECODE_MODES

    group.add_argument(
        "--decode-mode",
        choices=DECODE_MODES,
        default=None,
        help="decode steps: auto (default: CUDA graphs on a GPU, static shapes on CPU), static, "
        "torch.compile (not in serve and web), CUDA graphs, or plain",
    )


@dataclass
class LoadedModel:
    name: str
    tokenizer: Any
    model: Any


def model_name(args: argparse.Namespace) -> str:
    if args.model:
        return args.model
    from .demo import default_model

    return default_model()


def load_from_args(args: argparse.Namespace, show_progress: bool | None = None) -> LoadedModel:
    from . import QwenVLForCausalLM, QwenVLTokenizer

    name = model_name(args)
    options = {"revision": args.revision, "local_files_only": args.offline}
    tokenizer = QwenVLTokenizer.from_pretrained(name, **options)
    model = QwenVLForCausalLM.from_pretrained(
        name,
        bf16=args.bf16,
        fp16=args.fp16,
        fp32=args.fp32,
        device_map=args.device,
        show_progress=show_progress,
        **options,
    )
    if args.bf16 and model.device.type == "cpu":
        from .decode.cpu_ops import BF16_WITHOUT_NATIVE_PRODUCTS, onednn_bf16

        if not onednn_bf16():
            print(BF16_WITHOUT_NATIVE_PRODUCTS, file=sys.stderr)
    return LoadedModel(name, tokenizer, model)


def sampling_options(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments for model.chat / SamplingParams.from_config; unset flags are left out."""
    options = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "repetition_penalty": args.repetition_penalty,
        "seed": args.seed,
        "decode_mode": getattr(args, "decode_mode", None),
    }
    if args.greedy:
        options["do_sample"] = False
    return {k: v for k, v in options.items() if v is not None}


@contextlib.contextmanager
def interrupts_call(handler: Callable[[], None]) -> Iterator[None]:
    """Within the block, Ctrl-C (SIGINT) and SIGTERM call `handler` instead of interrupting.

    The servers run their engine in the main thread (`Engine.run_while`) and the HTTP server beside
    it: a signal asks the HTTP server to shut down, whose end then stops the engine. Main thread only.
    """
    previous = {sig: signal.signal(sig, lambda *_: handler()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, action in previous.items():
            signal.signal(sig, action)
