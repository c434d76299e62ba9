"""A picture of a fine-tuning run's loss, drawn from its log.jsonl with PIL alone.

The line runs over the steps on x and between the lowest and the highest loss on y; the axes are
labelled with the first and last step and with those two losses, and the title gives the last one.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence

from PIL import Image, ImageDraw

from ..grounding import load_label_font

LOSS_CURVE_FILE = "loss.png"
SIZE = (720, 420)
MARGINS = (120, 48, 28, 52)  # left (loss labels), top (title), right, bottom (step labels)
BACKGROUND, AXES, LINE, TEXT = (255, 255, 255), (70, 70, 70), (31, 119, 180), (20, 20, 20)


def read_losses(log_path: str | os.PathLike) -> list[tuple[int, float]]:
    """(step, loss) of each line of a log.jsonl; steps whose loss is not finite are left out."""
    points = []
    with open(log_path, encoding="utf-8") as file:
        for line in file:
            if line.strip():
                record = json.loads(line)
                if math.isfinite(record["loss"]):
                    points.append((int(record["step"]), float(record["loss"])))
    return points


def draw_loss_curve(points: Sequence[tuple[int, float]], size: tuple[int, int] = SIZE) -> Image.Image:
    """The loss over the steps: axes, the line, the first and last step, the lowest and highest loss."""
    if not points:
        raise ValueError("a loss curve needs at least one step")
    width, height = size
    left, top, right, bottom = MARGINS[0], MARGINS[1], width - MARGINS[2], height - MARGINS[3]
    steps = [step for step, _ in points]
    losses = [loss for _, loss in points]
    first, last = min(steps), max(steps)
    low, high = min(losses), max(losses)
    span = high - low or max(abs(high), 1.0)  # a flat curve is drawn across the middle

    def x(step: int) -> float:
        return left + (right - left) * ((step - first) / (last - first) if last > first else 0.5)

    def y(loss: float) -> float:
        return bottom - (bottom - top) * ((loss - low) / span if high > low else 0.5)

    image = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(image)
    font = load_label_font(15)
    draw.line([(left, top), (left, bottom), (right, bottom)], fill=AXES, width=2)
    line = [(x(step), y(loss)) for step, loss in sorted(points)]
    if len(line) > 1:
        draw.line(line, fill=LINE, width=2, joint="curve")
    else:
        (cx, cy), radius = line[0], 3
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=LINE)
    loss_labels = (
        [(high, f"max {high:.4g}"), (low, f"min {low:.4g}")] if high > low else [(low, f"{low:.4g}")]
    )
    for loss, label in loss_labels:
        draw.line([(left - 6, y(loss)), (left, y(loss))], fill=AXES, width=2)
        draw.text((left - 10, y(loss)), label, fill=TEXT, font=font, anchor="rm")
    step_labels = [(first, "lt"), (last, "rt")] if last > first else [(first, "mt")]
    for step, anchor in step_labels:
        draw.line([(x(step), bottom), (x(step), bottom + 6)], fill=AXES, width=2)
        draw.text((x(step), bottom + 10), f"step {step}", fill=TEXT, font=font, anchor=anchor)
    final = losses[steps.index(last)]
    title = f"training loss: {len(points)} steps, final {final:.4g}"
    draw.text((left, top // 2), title, fill=TEXT, font=font, anchor="lm")
    return image


def save_loss_curve(log_path: str | os.PathLike, image_path: str | os.PathLike) -> bool:
    """Draw the log's loss to `image_path` (a PNG); False, writing nothing, when it has no finite loss."""
    points = read_losses(log_path)
    if not points:
        return False
    draw_loss_curve(points).save(image_path)
    return True
