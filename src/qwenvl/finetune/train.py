"""The fine-tuning loop: plain PyTorch, AdamW with warmup and decay, accumulation, checkpoints, resume.

`finetune(model, tokenizer, items, TrainingConfig(...), output_dir)` trains in place and writes
`output_dir/` loadable by `QwenVLForCausalLM.from_pretrained` (or a LoRA adapter, see `lora.py`),
the tokenizer files, `log.jsonl` (one line per optimizer step) and, every `save_steps`,
`checkpoint-STEP/` folders from which `resume=True` continues exactly where the run stopped.

Exact resume rests on four things: the sample order of each epoch is a function of (seed, epoch)
alone, the torch RNG state (LoRA dropout) is saved with each checkpoint, the optimizer state is
saved whole, and the learning rate is a function of the step (so a resumed run may also extend
max_steps: the rest of its schedule follows the new total).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Iterator, Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ..loading import read_shard, weight_files
from ..modeling import QwenVLForCausalLM
from .checkpointing import set_gradient_checkpointing
from .data import IGNORE_INDEX, Batch, ConversationDataset, collate, load_items
from .lora import add_lora, load_adapter_weights
from .training_config import LRSchedule, TrainingConfig
from .vocabulary import CutVocabulary, data_ids

logger = logging.getLogger(__name__)

LOG_FILE = "log.jsonl"
STATE_FILE = "training_state.pt"
CONFIG_FILE = "training_config.json"
CHECKPOINT = re.compile(r"checkpoint-(\d+)")


class StepReport(Protocol):
    """What a run tells its caller as it goes (`qwenvl finetune` shows it: see finetune.cli)."""

    def begin(self, step: int, last: int, total: int) -> None:
        """Steps step+1..last run now, of a schedule of `total` (last < total: stopped early)."""

    def step(self, record: dict) -> None:
        """One optimizer step is done; `record` is its line of log.jsonl."""


# -- loss --------------------------------------------------------------------------------------------


def supervised_loss_sum(
    model: nn.Module, batch: Batch, vocabulary: CutVocabulary | None = None
) -> torch.Tensor:
    """Summed next-token cross-entropy over the labelled positions of `batch`.

    The same numbers as `model(**batch.model_inputs()).loss` times the label count, but `lm_head`
    runs only at the labelled positions: full logits are [B, L, 151936] floats, mostly for image
    spans and prompts that the loss ignores. With a cut `vocabulary` (whose other rows the model
    keeps tied) the numbers are still the same, and the head only reads the kept rows.
    """
    core = model if isinstance(model, QwenVLForCausalLM) else model.get_base_model()  # a peft wrapper
    transformer = core.transformer
    input_ids = batch.input_ids if vocabulary is None else vocabulary.input_ids(batch.input_ids)
    features = transformer.visual(batch.pixel_values) if batch.pixel_values is not None else None
    hidden = transformer(transformer.embed(input_ids, features), None, batch.lengths)
    targets = batch.labels[:, 1:]
    keep = targets != IGNORE_INDEX
    if vocabulary is None:
        logits, columns = core.lm_head(hidden[:, :-1][keep]), targets[keep]
    else:
        logits = vocabulary.logits(core.lm_head.weight, hidden[:, :-1][keep])
        columns = vocabulary.targets(targets[keep])
    # bf16 and fp16 logits are upcast, as the model's own loss does; a float64 model keeps float64
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    return F.cross_entropy(logits, columns, reduction="sum")


def label_count(batch: Batch) -> int:
    return int((batch.labels[:, 1:] != IGNORE_INDEX).sum())


# -- data order --------------------------------------------------------------------------------------


def epoch_order(size: int, config: TrainingConfig, epoch: int) -> list[int]:
    """The sample order of one epoch: a function of (seed, epoch) alone, so a resumed run sees the same."""
    if not config.shuffle:
        return list(range(size))
    return torch.randperm(size, generator=torch.Generator().manual_seed(config.seed + epoch)).tolist()


def micro_batches(size: int, config: TrainingConfig, start: int, stop: int) -> Iterator[list[int]]:
    """Sample indices of the run's micro-batches start..stop-1 (epochs follow one another)."""
    per_epoch = math.ceil(size / config.batch_size)
    for epoch in range(start // per_epoch, math.ceil(stop / per_epoch)):
        order = epoch_order(size, config, epoch)
        for k in range(per_epoch):
            if start <= epoch * per_epoch + k < stop:
                yield order[k * config.batch_size : (k + 1) * config.batch_size]


def total_steps(size: int, config: TrainingConfig) -> int:
    if config.max_steps is not None:
        return config.max_steps
    return math.ceil(config.epochs * math.ceil(size / config.batch_size) / config.grad_accum)


# -- the model ---------------------------------------------------------------------------------------


def prepare_model(model: nn.Module, config: TrainingConfig) -> nn.Module:
    """Freeze what does not train, add LoRA adapters, switch on checkpointing; returns the model to train."""
    model.train()
    if config.lora:
        model.requires_grad_(False)
        model = add_lora(model, config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_targets)
    else:
        model.requires_grad_(True)
        visual = model.transformer.visual
        if config.freeze_vision:
            visual.requires_grad_(False)
            visual.attn_pool.requires_grad_(True)
        visual.attn_pool.pos_embed.requires_grad_(False)  # a fixed sin-cos table in the original
    if config.gradient_checkpointing:
        set_gradient_checkpointing(model, True)
    return model


def make_optimizer(model: nn.Module, config: TrainingConfig) -> torch.optim.AdamW:
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # the fused kernel (CPU and CUDA) is several times faster than the per-tensor loop
    fused = all(p.device.type in ("cpu", "cuda") for p in trainable)
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=config.betas, fused=fused)


# -- checkpoints -------------------------------------------------------------------------------------


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, str]]:
    """(step, folder) of the complete checkpoints in `output_dir`, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = CHECKPOINT.fullmatch(name)
        folder = os.path.join(output_dir, name)
        if match and os.path.exists(os.path.join(folder, STATE_FILE)):
            found.append((int(match.group(1)), folder))
    return sorted(found)


def _rng_state() -> dict[str, object]:
    state: dict[str, object] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    """One fine-tuning run; `finetune` is the function to call."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        dataset: ConversationDataset,
        config: TrainingConfig,
        output_dir: str | os.PathLike,
    ):
        self.config, self.tokenizer, self.dataset = config, tokenizer, dataset
        self.output_dir = os.fspath(output_dir)
        self.device, self.core = model.device, model
        torch.manual_seed(config.seed)  # LoRA's initial weights
        self.vocabulary = None
        if config.cut_vocabulary:
            ids = data_ids(dataset.examples, tokenizer.special_tokens.values())
            self.vocabulary = CutVocabulary(ids, model.config.vocab_size).to(self.device)
            self.vocabulary.tie_others(model)
            logger.info("cut vocabulary: %d ids keep their own rows", self.vocabulary.size - 1)
        self.model = prepare_model(model, config)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.model, config)
        self.total = total_steps(len(dataset), config)
        warmup = (
            config.warmup_steps
            if config.warmup_steps is not None
            else round(config.warmup_ratio * self.total)
        )
        self.schedule = LRSchedule(warmup, self.total, config.lr_schedule)
        seq_length = self.core.config.seq_length
        if config.max_length > seq_length:
            # the original trains without dynamic NTK and log-n scaling; this model uses both past it
            logger.warning("max_length %d exceeds the model's seq_length %d", config.max_length, seq_length)
        self.bf16 = config.bf16
        if self.bf16 is None:
            self.bf16 = self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        self.step = 0
        self._rng: dict | None = None  # a checkpoint's RNG state, set right before the first step
        self._apply_lr()

    def _apply_lr(self) -> None:
        """The learning rate of the next step: a function of the step under this run's settings."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.learning_rate * self.schedule(self.step)

    def autocast(self) -> contextlib.AbstractContextManager:
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    # -- checkpoints

    def save_weights(self, folder: str) -> None:
        """The full model, or the LoRA adapter alone (peft's save_pretrained)."""
        if self.vocabulary is not None:  # the other rows drift under weight decay; the saved model
            self.vocabulary.tie_others(self.core)  # must be the one whose softmax was trained
        self.model.save_pretrained(folder)

    def save_checkpoint(self) -> str:
        folder = os.path.join(self.output_dir, f"checkpoint-{self.step}")
        partial = folder + ".tmp"  # renamed when complete: resume never sees half a checkpoint
        shutil.rmtree(partial, ignore_errors=True)
        self.save_weights(partial)
        state = {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "rng": _rng_state(),
        }
        torch.save(state, os.path.join(partial, STATE_FILE))
        with open(os.path.join(partial, CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(dataclasses.asdict(self.config), f, indent=2)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(partial, folder)
        if self.config.save_total_limit:
            for _, old in list_checkpoints(self.output_dir)[: -self.config.save_total_limit]:
                shutil.rmtree(old)
        logger.info("saved %s", folder)
        return folder

    def load_checkpoint(self, folder: str) -> None:
        """Weights, optimizer, RNG and step of a checkpoint written by `save_checkpoint`."""
        if self.config.lora:
            load_adapter_weights(self.model, folder)
        else:
            state = dict(pair for path in weight_files(folder) for pair in read_shard(path))
            result = self.model.load_state_dict(state, strict=False)
            tied = {"lm_head.weight"} if self.core.config.tie_word_embeddings else set()
            if result.unexpected_keys or set(result.missing_keys) - tied:
                raise ValueError(f"the weights in {folder} do not fit this model: {result}")
        state = torch.load(os.path.join(folder, STATE_FILE), map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]
        self._apply_lr()
        self._rng = state["rng"]
        self._check_resumed_config(folder)
        logger.info("resuming from %s (step %d of %d)", folder, self.step, self.total)

    def _check_resumed_config(self, folder: str) -> None:
        path = os.path.join(folder, CONFIG_FILE)
        if not os.path.exists(path):
            return
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        current = json.loads(json.dumps(dataclasses.asdict(self.config)))
        changed = [
            k
            for k, v in current.items()
            if k not in ("resume", "save_total_limit", "stop_at", "logging_steps") and saved.get(k) != v
        ]
        if changed:
            logger.warning("resuming with settings that differ from the checkpoint's: %s", ", ".join(changed))

    def resume_folder(self) -> str | None:
        resume = self.config.resume
        if isinstance(resume, str):
            if not os.path.exists(os.path.join(resume, STATE_FILE)):
                raise ValueError(f"{resume} is not a checkpoint folder (it has no {STATE_FILE})")
            return resume
        found = list_checkpoints(self.output_dir)
        if resume and not found:
            logger.warning("no checkpoint in %s to resume from: starting from step 0", self.output_dir)
        return found[-1][1] if resume and found else None

    # -- the loop

    def batches(self) -> Iterator[Batch]:
        """Micro-batches from the current step on."""
        accum = self.config.grad_accum
        loader = DataLoader(
            self.dataset,
            batch_sampler=micro_batches(
                len(self.dataset), self.config, self.step * accum, self.total * accum
            ),
            collate_fn=functools.partial(collate, pad_id=self.tokenizer.pad_token_id),
            num_workers=self.config.num_workers,
            # its own generator: creating the loader must not draw from the global RNG (exact resume)
            generator=torch.Generator().manual_seed(self.config.seed),
        )
        return iter(loader)

    def train_step(self, batches: Sequence[Batch]) -> tuple[float, float | None]:
        """One optimizer step over `batches`: (mean loss per labelled token, gradient norm)."""
        # the loss is averaged over all labelled tokens of the step, so accumulating k micro-batches
        # gives the gradient of one k-times larger batch
        labels = max(1, sum(label_count(batch) for batch in batches))
        loss_sum = 0.0
        for batch in batches:
            with self.autocast():
                loss = supervised_loss_sum(self.model, batch.to(self.device), self.vocabulary)
            (loss / labels).backward()
            loss_sum += loss.item()
        grad_norm = None
        if self.config.max_grad_norm:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum / labels, grad_norm

    def _open_log(self):
        path = os.path.join(self.output_dir, LOG_FILE)
        kept = []
        if self.step and os.path.exists(path):  # drop lines past the checkpoint we resume from
            with open(path, encoding="utf-8") as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] <= self.step]
        log = open(path, "w", encoding="utf-8")  # closed at the end of train
        log.writelines(kept)
        return log

    def train(self, report: StepReport | None = None) -> list[dict]:
        """Run to the last step; returns this run's log records. Each step goes to `report`, or
        without one, every `logging_steps` to the logger."""
        os.makedirs(self.output_dir, exist_ok=True)
        folder = self.resume_folder()
        if folder:
            self.load_checkpoint(folder)
        elif list_checkpoints(self.output_dir):
            logger.warning(
                "%s holds checkpoints of an earlier run; pass resume to continue it", self.output_dir
            )
        batches = self.batches()
        if self._rng is not None:
            _set_rng_state(self._rng)
        records = []
        last = self.total if self.config.stop_at is None else min(self.total, self.config.stop_at)
        if report is not None:
            report.begin(self.step, last, self.total)
        with self._open_log() as log:
            while self.step < last:
                started = time.perf_counter()  # tokens/s counts reading the data too
                record = self._run_step([next(batches) for _ in range(self.config.grad_accum)], started)
                records.append(record)
                log.write(json.dumps(record) + "\n")
                log.flush()
                if report is not None:
                    report.step(record)
                elif self.step % self.config.logging_steps == 0 or self.step == last:
                    logger.info(
                        "step %d/%d loss %.4f lr %.3g", self.step, self.total, record["loss"], record["lr"]
                    )
                save_steps = self.config.save_steps
                on_schedule = bool(save_steps) and self.step % save_steps == 0
                # an invocation that stops early leaves the checkpoint the next one resumes from
                if self.step < self.total and (on_schedule or self.step == last):
                    self.save_checkpoint()
        return records

    def _run_step(self, batches: list[Batch], started: float) -> dict:
        lr = self.optimizer.param_groups[0]["lr"]
        loss, grad_norm = self.train_step(batches)
        self.step += 1
        self._apply_lr()
        tokens = sum(int(batch.attention_mask.sum()) for batch in batches)
        per_epoch = math.ceil(len(self.dataset) / self.config.batch_size)
        return {
            "step": self.step,
            "epoch": round(self.step * self.config.grad_accum / per_epoch, 4),
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": round(tokens / (time.perf_counter() - started), 1),
        }

    def save_final(self) -> nn.Module:
        """Write the final folder; returns the trained model (merged when LoRA is merged)."""
        set_gradient_checkpointing(self.model, False)
        model = self.model
        if self.config.lora and self.config.merge:
            model = model.merge_and_unload()
        if self.vocabulary is not None:
            self.vocabulary.tie_others(self.core)
        model.save_pretrained(self.output_dir)
        self.tokenizer.save_pretrained(self.output_dir)
        logger.info("saved the result to %s", self.output_dir)
        return model.eval()


def finetune(
    model: nn.Module,
    tokenizer,
    train_items: Sequence[dict] | ConversationDataset | str | os.PathLike,
    config: TrainingConfig | None = None,
    output_dir: str | os.PathLike = "finetuned",
    *,
    base_dir: str | os.PathLike | None = None,
    report: StepReport | None = None,
) -> nn.Module:
    """Fine-tune `model` (a QwenVLForCausalLM) on conversations and save it to `output_dir`.

    `train_items`: samples in Qwen-VL's format, a ConversationDataset, or the path of a JSON file.
    Relative image paths are resolved against `base_dir` (default: the data file's folder, else the
    working directory). `report` hears of each step (else the logger does, every `logging_steps`).
    Returns the trained model: merged for LoRA with `merge`, else the PeftModel.
    """
    config = config or TrainingConfig()
    if isinstance(train_items, (str, os.PathLike)):
        base_dir = base_dir or os.path.dirname(os.path.abspath(train_items))
        train_items = load_items(train_items)
    dataset = train_items
    if not isinstance(dataset, ConversationDataset):
        image_size = model.config.vision.image_size
        dataset = ConversationDataset(
            train_items, tokenizer, base_dir or ".", config.max_length, image_size, config.system
        )
    trainer = Trainer(model, tokenizer, dataset, config, output_dir)
    trainer.train(report)
    return trainer.save_final()
