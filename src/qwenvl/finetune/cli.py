"""`qwenvl finetune` / `python -m qwenvl.finetune`: arguments -> TrainingConfig -> `finetune`.

Both show the same: a progress bar on a terminal, else a line every --logging-steps steps (and the
library's log messages as lines); at the end a summary on stdout and a loss curve beside log.jsonl.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TextIO

from ..chat_format import DEFAULT_SYSTEM
from ..frontend import MissingExtraError, require_extra
from ..progress import Progress, format_duration, show_logs
from .lora import DEFAULT_LORA_TARGETS
from .training_config import TrainingConfig


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `finetune` options, added to `parser` (a subcommand's parser or a fresh one)."""
    parser.add_argument("--model", required=True, help="model folder or hub id to start from")
    parser.add_argument("--data", required=True, help="training data: a JSON list in Qwen-VL's format")
    parser.add_argument("--output", required=True, help="folder for checkpoints, log.jsonl and the result")
    run = parser.add_argument_group("schedule")
    run.add_argument("--epochs", type=int, default=1)
    run.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    run.add_argument(
        "--stop-at",
        type=int,
        default=None,
        metavar="STEP",
        help="stop at this step with a checkpoint, to --resume later (the schedule spans --max-steps)",
    )
    run.add_argument("--batch-size", type=int, default=1, help="sequences per micro-batch")
    run.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    run.add_argument("--lr", type=float, default=None, help="peak learning rate (default 1e-5, LoRA 1e-4)")
    run.add_argument("--weight-decay", type=float, default=0.1)
    run.add_argument("--warmup-ratio", type=float, default=0.01)
    run.add_argument("--warmup-steps", type=int, default=None, help="overrides --warmup-ratio")
    run.add_argument("--lr-schedule", choices=("cosine", "linear", "constant"), default="cosine")
    run.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: off)")
    run.add_argument("--max-length", type=int, default=2048, help="tokens per sequence (longer: truncated)")
    run.add_argument("--seed", type=int, default=42)
    run.add_argument("--system", default=DEFAULT_SYSTEM, help="system message of every sequence")
    run.add_argument("--num-workers", type=int, default=0, help="DataLoader processes reading images")

    model = parser.add_argument_group("model")
    model.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    precision = model.add_mutually_exclusive_group()
    precision.add_argument(
        "--bf16", dest="bf16", action="store_true", default=None, help="compute in bf16 (default on CUDA)"
    )
    precision.add_argument("--fp32", dest="bf16", action="store_false", help="compute in fp32")
    model.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations")
    model.add_argument(
        "--cut-vocabulary",
        action="store_true",
        help="small models from scratch: only the ids the data uses keep their own embedding rows, "
        "all others share one (the same loss, a much cheaper LM head)",
    )
    vision = model.add_mutually_exclusive_group()
    vision.add_argument(
        "--freeze-vision",
        dest="freeze_vision",
        action="store_true",
        default=True,
        help="freeze the ViT, train the resampler (default)",
    )
    vision.add_argument(
        "--train-vision", dest="freeze_vision", action="store_false", help="train the ViT too"
    )

    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--lora", action="store_true", help="train LoRA adapters instead of all weights")
    lora.add_argument("--lora-r", type=int, default=64)
    lora.add_argument("--lora-alpha", type=float, default=16)
    lora.add_argument("--lora-dropout", type=float, default=0.05)
    lora.add_argument(
        "--lora-target",
        default=",".join(DEFAULT_LORA_TARGETS),
        help="comma-separated LLM layer names (default: %(default)s)",
    )
    lora.add_argument(
        "--merge",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="save the adapter merged into the weights (default), or the adapter alone",
    )

    saving = parser.add_argument_group("checkpoints")
    saving.add_argument("--save-steps", type=int, default=None, help="checkpoint every N optimizer steps")
    saving.add_argument("--save-total-limit", type=int, default=None, help="keep the newest N checkpoints")
    saving.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="CHECKPOINT",
        help="continue from the newest checkpoint in --output (or from the given folder)",
    )
    saving.add_argument(
        "--logging-steps",
        type=int,
        default=10,
        metavar="N",
        help="without a terminal (a log file, CI), a progress line every N steps (default: 10); "
        "a terminal shows a progress bar",
    )
    return parser


def config_from_args(args: argparse.Namespace) -> TrainingConfig:
    targets = tuple(name.strip() for name in args.lora_target.split(",") if name.strip())
    return TrainingConfig(
        epochs=args.epochs,
        max_steps=args.max_steps,
        stop_at=args.stop_at,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_ratio=args.warmup_ratio,
        warmup_steps=args.warmup_steps,
        lr_schedule=args.lr_schedule,
        max_grad_norm=args.max_grad_norm or None,
        max_length=args.max_length,
        seed=args.seed,
        bf16=args.bf16,
        gradient_checkpointing=args.gradient_checkpointing,
        freeze_vision=args.freeze_vision,
        lora=args.lora,
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        lora_targets=targets,
        merge=args.merge,
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        resume=args.resume,
        logging_steps=args.logging_steps,
        num_workers=args.num_workers,
        system=args.system,
        cut_vocabulary=args.cut_vocabulary,
    )


class TrainingConsole:
    """What a person sees of a run (a `StepReport`): a bar on a terminal, else a line every `every`
    steps, on `stream`; `summary` afterwards."""

    def __init__(self, stream: TextIO, every: int, bar: bool | None = None):
        self.stream, self.every, self.bar = stream, every, bar
        self.progress: Progress | None = None
        self.first = self.last = self.total = 0
        self.final_loss: float | None = None

    def begin(self, step: int, last: int, total: int) -> None:
        self.first, self.last, self.total = step, last, total
        self.progress = Progress(
            last, "step", initial=step, every=self.every, stream=self.stream, bar=self.bar
        )

    def step(self, record: dict) -> None:
        self.final_loss = record["loss"]
        self.progress.update(1, f"loss {record['loss']:.4f} lr {record['lr']:.2e}")

    def write(self, text: str) -> None:
        if self.progress is not None:
            self.progress.write(text)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()

    def summary(self, output_dir: str, log_file: str, curve_file: str | None) -> str:
        """Which steps ran, how long they took, the last loss, and where the results are."""
        if self.progress is None or self.final_loss is None:
            return f"finetune: nothing to train: {output_dir} is at step {self.first} of {self.total}"
        took = format_duration(self.progress.elapsed)
        steps = f"step {self.last}" if self.last == self.first + 1 else f"steps {self.first + 1}-{self.last}"
        lines = [f"finetune: {steps} of {self.total} in {took}, final loss {self.final_loss:.4f}"]
        if self.last < self.total:
            lines.append(f"stopped at step {self.last}: add --resume to continue from its checkpoint")
        lines.append(f"saved to {output_dir}")
        lines.append(f"log: {log_file}" + (f", loss curve: {curve_file}" if curve_file else ""))
        return "\n".join(lines)


def run_from_args(args: argparse.Namespace) -> int:
    """Load the model and tokenizer, train, save, summarize; returns the exit status."""
    config = config_from_args(args)
    if config.lora:
        require_extra("finetune", "finetune", "peft")  # before the model loads, which takes a while
    console = TrainingConsole(sys.stderr, config.logging_steps)
    with show_logs(console.write):
        try:
            _train(args, config, console)
        finally:
            console.close()
    from .loss_curve import LOSS_CURVE_FILE, save_loss_curve
    from .train import LOG_FILE

    log_file = os.path.join(args.output, LOG_FILE)
    curve_file = os.path.join(args.output, LOSS_CURVE_FILE)
    drawn = os.path.exists(log_file) and save_loss_curve(log_file, curve_file)
    print(console.summary(args.output, log_file, curve_file if drawn else None), flush=True)
    return 0


def _train(args: argparse.Namespace, config: TrainingConfig, console: TrainingConsole) -> None:
    import torch

    from .. import QwenVLForCausalLM, QwenVLTokenizer
    from ..loading import resolve_device
    from .train import finetune

    device = resolve_device(args.device)
    bf16 = config.bf16
    if bf16 is None:
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    # trained weights stay fp32 under bf16 autocast; a LoRA base is frozen, so bf16 weights suffice
    dtype = torch.bfloat16 if bf16 and config.lora else torch.float32
    tokenizer = QwenVLTokenizer.from_pretrained(args.model)
    model = QwenVLForCausalLM.from_pretrained(args.model, dtype=dtype, device_map=str(device))
    finetune(model, tokenizer, args.data, config, args.output, report=console)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m qwenvl.finetune", description="Fine-tune Qwen-VL on conversations with images."
    )
    args = add_arguments(parser).parse_args(argv)
    from ..images import ImageError

    try:
        return run_from_args(args)
    except (ImageError, MissingExtraError, OSError, ValueError) as e:  # DataError is a ValueError
        print(f"qwenvl finetune: error: {e}", file=sys.stderr)
        return 2
