"""What a fine-tuning run is asked to do (`TrainingConfig`), and its learning-rate schedule."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from ..chat_format import DEFAULT_SYSTEM
from .lora import DEFAULT_LORA_TARGETS

SCHEDULES = ("cosine", "linear", "constant")


@dataclass
class TrainingConfig:
    """Every setting of a run; `qwenvl finetune --help` describes the same options."""

    epochs: int = 1
    max_steps: int | None = None  # optimizer steps; overrides epochs
    # end this invocation at that step with a checkpoint (the schedule still runs to the last
    # step): long runs in pieces, each resumed from the last
    stop_at: int | None = None
    batch_size: int = 1
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float | None = None  # None: 1e-5 for full fine-tuning, 1e-4 for LoRA
    weight_decay: float = 0.1  # on matrices only, not on norms and biases
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_ratio: float = 0.01
    warmup_steps: int | None = None  # overrides warmup_ratio
    lr_schedule: str = "cosine"  # after warmup: cosine or linear decay to 0, or constant
    max_grad_norm: float | None = 1.0
    max_length: int = 2048
    seed: int = 42
    shuffle: bool = True
    bf16: bool | None = None  # autocast to bf16; None: on when CUDA supports bf16
    gradient_checkpointing: bool = False
    freeze_vision: bool = (
        True  # the ViT is frozen; the resampler (attn_pool) trains, as the original's fix_vit
    )
    lora: bool = False
    lora_r: int = 64
    lora_alpha: float = 16
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
    merge: bool = True  # LoRA: save the merged model at the end (else the adapter alone)
    save_steps: int | None = None  # checkpoint every N optimizer steps
    save_total_limit: int | None = None  # keep only the newest N checkpoints
    resume: bool | str | os.PathLike = False  # True: the newest checkpoint in the output folder; or a folder
    logging_steps: int = 10  # log.jsonl gets every step; the logger every N
    num_workers: int = 0  # DataLoader processes reading images
    # small models from scratch: only the data's ids keep their own rows (see vocabulary.py)
    cut_vocabulary: bool = False
    system: str = DEFAULT_SYSTEM

    def __post_init__(self) -> None:
        positive = ("epochs", "batch_size", "grad_accum", "max_length", "lora_r", "logging_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_steps", "save_steps", "save_total_limit", "stop_at"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1 (or None), got {getattr(self, name)}")
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(f"lr_schedule {self.lr_schedule!r}: expected one of {SCHEDULES}")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.lora and not self.freeze_vision:
            raise ValueError("with LoRA only the LLM's adapters train; train_vision is not supported")
        if self.lora and self.cut_vocabulary:
            raise ValueError(
                "cut_vocabulary rewrites the embedding rows: it needs full fine-tuning, not LoRA"
            )
        self.betas, self.lora_targets = tuple(self.betas), tuple(self.lora_targets)
        if not isinstance(self.resume, bool):
            self.resume = os.fspath(self.resume)

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (1e-4 if self.lora else 1e-5)


@dataclass
class LRSchedule:
    """The learning-rate factor of optimizer step `step` (0-based): linear warmup, then decay to 0."""

    warmup: int
    total: int
    kind: str = "cosine"

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        if self.kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress if self.kind == "linear" else 1.0
