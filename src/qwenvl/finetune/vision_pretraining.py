"""Pretraining a vision tower on the synthetic world's dense labels (what lies under each patch).

The real Qwen-VL starts from a ViT pretrained on image-text pairs; a small model trained from
scratch on the shapes world has no such tower, and learning to see shapes through the language
loss alone is slow: after 11,000 steps the demo model named a shape right 40% of the time, while
counting (which only needs "something is here") was right 94% of the time. Here the ViT learns
what each patch holds, with fresh scenes every step: the kind and the colour of the shape
covering it (soft targets: the covered fractions) and that shape's box. Linear heads read them
off the ViT's output, so the resampler and the LLM can read them too; the heads are discarded.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..images import preprocess
from ..synthetic.patch_labels import patch_labels
from ..synthetic.scene import COLOURS, KINDS, random_scene, render

# the demo model's run (`python -m qwenvl.demo_model pretrain-vision` defaults): kind accuracy
# sits near chance for ~600 steps, then climbs to ~0.9 by step 800
STEPS = 2000
LR = 2e-3
BOX_LOSS_WEIGHT = 4.0  # boxes are 0..1 fractions: their errors are small next to the class losses
KIND_LOSS_WEIGHT = 2.0  # the kinds among themselves, on the patches shapes cover
COVERED = 0.5  # a patch "belongs" to a shape (for accuracy and boxes) from half coverage on


class DenseHeads(nn.Module):
    """Per-patch linear read-outs of a ViT's features: kind, colour and box of what covers the patch."""

    def __init__(self, width: int):
        super().__init__()
        self.kinds = nn.Linear(width, 1 + len(KINDS))
        self.colours = nn.Linear(width, 1 + len(COLOURS))
        self.boxes = nn.Linear(width, 4)

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: head(features) for name, head in self.named_children()}


@dataclass
class SceneBatch:
    pixels: torch.Tensor  # [N, 3, S, S]
    kinds: torch.Tensor  # [N, P, 1 + kinds]
    colours: torch.Tensor  # [N, P, 1 + colours]
    boxes: torch.Tensor  # [N, P, 4]
    box_weight: torch.Tensor  # [N, P]


def scene_batch(rng: random.Random, count: int, image_size: int, patch_size: int) -> SceneBatch:
    """`count` fresh random scenes as the model's pixels, with their dense labels."""
    grid = image_size // patch_size
    scenes = [random_scene(rng) for _ in range(count)]
    labels = [patch_labels(scene, grid) for scene in scenes]

    def stack(name: str) -> torch.Tensor:
        return torch.from_numpy(np.stack([getattr(label, name) for label in labels]))

    pixels = preprocess([render(scene) for scene in scenes], image_size)
    return SceneBatch(pixels, stack("kinds"), stack("colours"), stack("boxes"), stack("box_weight"))


class SceneBatches(torch.utils.data.IterableDataset):
    """An endless stream of `scene_batch`es from one seeded random stream (drawn in a worker process)."""

    def __init__(self, stream: str, batch_size: int, image_size: int, patch_size: int):
        super().__init__()
        self.stream, self.batch_size = stream, batch_size
        self.image_size, self.patch_size = image_size, patch_size

    def __iter__(self):
        rng = random.Random(self.stream)
        while True:
            yield scene_batch(rng, self.batch_size, self.image_size, self.patch_size)


def dense_loss(outputs: dict[str, torch.Tensor], batch: SceneBatch) -> tuple[torch.Tensor, dict[str, float]]:
    """Soft cross-entropy on kinds and colours, coverage-weighted smooth L1 on boxes; and metrics."""
    kinds = F.cross_entropy(outputs["kinds"].flatten(0, 1), batch.kinds.flatten(0, 1))
    # most patches are background, and telling a shape from the background is easy; the kinds
    # among themselves, weighted by how much of the patch a shape covers, are what is hard
    covered = batch.kinds[..., 1:].sum(-1)
    among = F.cross_entropy(
        outputs["kinds"][..., 1:].flatten(0, 1),
        (batch.kinds[..., 1:] / covered.clamp_min(1e-6)[..., None]).flatten(0, 1),
        reduction="none",
    )
    kinds = kinds + KIND_LOSS_WEIGHT * (among * covered.flatten()).sum() / covered.sum().clamp_min(1.0)
    colours = F.cross_entropy(outputs["colours"].flatten(0, 1), batch.colours.flatten(0, 1))
    box_error = F.smooth_l1_loss(outputs["boxes"], batch.boxes, reduction="none", beta=0.05).sum(-1)
    weight = batch.box_weight
    boxes = (box_error * weight).sum() / weight.sum().clamp_min(1.0)
    loss = kinds + colours + BOX_LOSS_WEIGHT * boxes
    with torch.no_grad():
        shape = batch.kinds[..., 1:].amax(-1) >= COVERED  # patches mostly inside a shape
        right_kind = outputs["kinds"].argmax(-1) == batch.kinds.argmax(-1)
        right_colour = outputs["colours"].argmax(-1) == batch.colours.argmax(-1)
        background = ~shape & (batch.kinds[..., 0] >= COVERED)
        box_mae = (outputs["boxes"] - batch.boxes).abs().mean(-1)
        metrics = {
            "loss": loss.item(),
            "kind_accuracy": right_kind[shape].float().mean().item(),
            "colour_accuracy": right_colour[shape].float().mean().item(),
            "background_accuracy": right_kind[background].float().mean().item(),
            "box_error": box_mae[shape].mean().item(),
        }
    return loss, metrics


def vision_parameters(visual: nn.Module) -> list[nn.Parameter]:
    """What pretraining changes: the patch embedding, ln_pre and the blocks; not the position table
    (the resampler keeps reading the same positions) nor the resampler itself."""
    return [
        *visual.conv1.parameters(),
        *visual.ln_pre.parameters(),
        *visual.transformer.parameters(),
    ]


def pretrain_vision(
    visual: nn.Module,
    *,
    steps: int = STEPS,
    batch_size: int = 32,
    lr: float = LR,
    warmup_steps: int = 100,
    seed: int = 0,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, float]:
    """Train `visual` (a VisionTransformer) in place on fresh scenes; returns held-out metrics.

    AdamW, linear warmup then cosine decay to 0. The held-out metrics come from scenes of
    another random stream than training's, scored after the last step.
    """
    cfg = visual.config
    torch.manual_seed(seed)
    heads = DenseHeads(cfg.width)
    trained = [*vision_parameters(visual), *heads.parameters()]
    optimizer = torch.optim.AdamW(trained, lr=lr, weight_decay=0.0)

    def rate(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, steps - warmup_steps)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, rate)
    stream_name = f"qwenvl-vision-pretraining/train/{seed}"
    stream = SceneBatches(stream_name, batch_size, cfg.image_size, cfg.patch_size)
    # one worker draws the next scenes while this process trains on the last
    batches = iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=1))
    visual.train()
    for step in range(steps):
        batch = next(batches)
        loss, metrics = dense_loss(heads(visual.patch_features(batch.pixels)), batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        schedule.step()
        if on_step is not None:
            on_step(step + 1, metrics)
    visual.eval()
    held_out = random.Random(f"qwenvl-vision-pretraining/eval/{seed}")
    batch = scene_batch(held_out, 4 * batch_size, cfg.image_size, cfg.patch_size)
    with torch.no_grad():
        return dense_loss(heads(visual.patch_features(batch.pixels)), batch)[1]
