"""Scenes of the synthetic world and their pictures: 1..3 flat shapes on a light background.

A scene is pure data (every random choice is made by :func:`random_scene`), so :func:`render`
draws the same pixels for the same scene. Boxes are pixel boxes ``(x1, y1, x2, y2)`` with ``x2``
and ``y2`` exclusive: a shape covers the pixels ``x1 <= x < x2``, ``y1 <= y < y2``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from ..grounding import load_label_font

RGB = tuple[int, int, int]
PixelBox = tuple[int, int, int, int]

KINDS = ("circle", "square", "triangle")
COLOURS: dict[str, RGB] = {
    "red": (220, 30, 40),
    "green": (40, 170, 60),
    "blue": (30, 80, 210),
    "yellow": (240, 200, 20),
}
TEXTURES = ("plain", "stripes", "noise", "gradient", "checker")

COLOUR_JITTER = 12  # per channel; far below the distance between any two named colours
SUPERSAMPLING = 4  # shapes are drawn 4x larger and reduced: smooth edges, exact boxes
LABEL_WORDS = ("OK", "AB", "cat", "sun", "Qwen", "hello", "map", "你好", "北京", "七")


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    box: PixelBox
    rgb: RGB

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown shape kind {self.kind!r}; expected one of {KINDS}")
        if self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}; expected one of {tuple(COLOURS)}")
        x1, y1, x2, y2 = self.box
        if x2 <= x1 or y2 <= y1:
            raise ValueError(f"empty shape box {self.box}")

    def normalized_box(self, width: int, height: int) -> PixelBox:
        """The box in the model's 0..1000 coordinates; ``Box.to_pixels`` maps it back within 1 px."""
        sizes = (width, height)
        return tuple(min(1000, max(0, round(v / sizes[i % 2] * 1000))) for i, v in enumerate(self.box))


@dataclass(frozen=True)
class Background:
    texture: str  # one of TEXTURES
    base: RGB
    other: RGB  # the second tone of stripes, gradient and checker
    period: int  # stripe period or checker cell, in pixels
    direction: int  # 0 horizontal, 1 vertical, 2 diagonal
    seed: int  # for the noise texture

    def __post_init__(self) -> None:
        if self.texture not in TEXTURES:
            raise ValueError(f"unknown background texture {self.texture!r}; expected one of {TEXTURES}")


@dataclass(frozen=True)
class Label:
    """A short dark text (digits or a word) drawn at ``origin``; ``box`` is where its ink lies."""

    text: str
    origin: tuple[int, int]
    size: int
    box: PixelBox
    grey: int


@dataclass(frozen=True)
class Scene:
    width: int
    height: int
    background: Background
    shapes: tuple[Shape, ...]
    labels: tuple[Label, ...] = field(default=())

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height

    def shape_of_kind(self, kind: str) -> Shape | None:
        return next((s for s in self.shapes if s.kind == kind), None)

    def shapes_of_colour(self, colour: str) -> list[Shape]:
        return [s for s in self.shapes if s.colour == colour]

    def left_to_right(self) -> list[Shape]:
        """Shapes in reading order by their centres; captions list them this way."""
        return sorted(self.shapes, key=lambda s: (s.box[0] + s.box[2], s.box[1] + s.box[3]))


# -- random scenes ---------------------------------------------------------------------------------


def random_size(
    rng: random.Random,
    size_range: tuple[int, int] = (256, 640),
    aspect_range: tuple[float, float] = (0.6, 1.7),
) -> tuple[int, int]:
    """A picture size: the geometric mean of the sides peaks at 448, width/height in aspect_range."""
    low, high = size_range
    mean = rng.triangular(low, high, min(max(448, low), high))
    aspect = math.exp(rng.uniform(math.log(aspect_range[0]), math.log(aspect_range[1])))
    width = round(min(max(mean * math.sqrt(aspect), low), high))
    height = round(min(max(mean / math.sqrt(aspect), low), high))
    return width, height


def random_scene(
    rng: random.Random,
    size: tuple[int, int] | None = None,
    *,
    size_range: tuple[int, int] = (256, 640),
    aspect_range: tuple[float, float] = (0.6, 1.7),
    max_shapes: int = 3,
    labels: bool = True,
) -> Scene:
    """A scene with 1..max_shapes shapes of different kinds that neither overlap nor touch the border.

    Kinds are all different, so "the circle" and "the red circle" each name one shape.
    """
    if not 1 <= max_shapes <= len(KINDS):
        raise ValueError(f"max_shapes must be 1..{len(KINDS)}, got {max_shapes}")
    width, height = size if size is not None else random_size(rng, size_range, aspect_range)
    if min(width, height) < 64:
        raise ValueError(f"picture {width}x{height} is too small for the shapes (need 64 px per side)")
    count = rng.randint(1, max_shapes)
    kinds = rng.sample(KINDS, count)
    boxes = _place_boxes(rng, width, height, count)
    shapes = tuple(_random_shape(rng, kind, box) for kind, box in zip(kinds, boxes, strict=True))
    background = _random_background(rng)
    placed = _place_labels(rng, width, height, boxes) if labels else ()
    return Scene(width, height, background, shapes, placed)


def _random_shape(rng: random.Random, kind: str, box: PixelBox) -> Shape:
    colour = rng.choice(tuple(COLOURS))
    rgb = tuple(min(255, max(0, c + rng.randint(-COLOUR_JITTER, COLOUR_JITTER))) for c in COLOURS[colour])
    return Shape(kind, colour, box, rgb)


def _margin(width: int, height: int) -> int:
    return max(6, round(0.03 * min(width, height)))


def _apart(a: PixelBox, b: PixelBox, gap: int) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def _place_boxes(rng: random.Random, width: int, height: int, count: int) -> list[PixelBox]:
    """Square boxes, each side 14%..38% of the shorter picture side, kept `margin` apart."""
    short = min(width, height)
    margin = _margin(width, height)
    largest = (0.38, 0.34, 0.30)[count - 1]
    for attempt in range(50):
        shrink = 0.97**attempt  # crowded layouts retry with smaller shapes
        boxes: list[PixelBox] = []
        for _ in range(count):
            side = round(short * rng.uniform(0.14, largest) * shrink)
            for _ in range(100):
                x1 = rng.randint(margin, width - margin - side)
                y1 = rng.randint(margin, height - margin - side)
                box = (x1, y1, x1 + side, y1 + side)
                if all(_apart(box, other, margin) for other in boxes):
                    boxes.append(box)
                    break
            else:
                break
        if len(boxes) == count:
            return boxes
    raise RuntimeError(f"could not place {count} shapes in a {width}x{height} picture")


def _random_background(rng: random.Random) -> Background:
    texture = rng.choice(TEXTURES)
    level = rng.randint(215, 248)  # light, and only slightly tinted, so every shape colour stands out
    base = tuple(min(255, level + rng.randint(-8, 7)) for _ in range(3))
    shade = rng.randint(10, 24)
    other = tuple(max(0, c - shade + rng.randint(-4, 4)) for c in base)
    return Background(texture, base, other, rng.randint(10, 40), rng.randrange(3), rng.getrandbits(32))


def _place_labels(rng: random.Random, width: int, height: int, boxes: list[PixelBox]) -> tuple[Label, ...]:
    """Zero to two short texts away from the shapes (skipped when there is no room)."""
    labels: list[Label] = []
    margin = _margin(width, height)
    for _ in range(rng.choice((0, 0, 1, 1, 2))):
        text = str(rng.randint(0, 999)) if rng.random() < 0.5 else rng.choice(LABEL_WORDS)
        size = rng.randint(14, 28)
        left, top, right, bottom = load_label_font(size).getbbox(text)
        for _ in range(30):
            x = rng.randint(margin, max(margin, width - margin - right))
            y = rng.randint(margin, max(margin, height - margin - bottom))
            ink = (x + left, y + top, x + right, y + bottom)
            inside = ink[2] <= width - margin and ink[3] <= height - margin
            taken = [*boxes, *(label.box for label in labels)]
            if inside and all(_apart(ink, other, margin) for other in taken):
                labels.append(Label(text, (x, y), size, ink, rng.randint(20, 90)))
                break
    return tuple(labels)


# -- rendering -------------------------------------------------------------------------------------


def render(scene: Scene) -> Image.Image:
    """The scene as an RGB picture."""
    canvas = Image.fromarray(_background_pixels(scene.background, scene.width, scene.height), "RGB")
    for shape in scene.shapes:
        mask = shape_mask(shape)
        canvas.paste(Image.new("RGB", mask.size, shape.rgb), shape.box[:2], mask)
    if scene.labels:
        draw = ImageDraw.Draw(canvas)
        for label in scene.labels:
            grey = (label.grey,) * 3
            draw.text(label.origin, label.text, fill=grey, font=load_label_font(label.size))
    return canvas


def shape_mask(shape: Shape) -> Image.Image:
    """Coverage of the shape over its box ("L", the box's size), anti-aliased by drawing large and
    reducing: what `render` paints with."""
    x1, y1, x2, y2 = shape.box
    width, height, kind = x2 - x1, y2 - y1, shape.kind
    s = SUPERSAMPLING
    big = Image.new("L", (width * s, height * s), 0)
    draw = ImageDraw.Draw(big)
    right, bottom = width * s - 1, height * s - 1
    if kind == "circle":
        draw.ellipse((0, 0, right, bottom), fill=255)
    elif kind == "square":
        draw.rectangle((0, 0, right, bottom), fill=255)
    else:  # an upright isosceles triangle: apex at the top middle, base along the bottom edge
        draw.polygon([(right / 2, 0), (right, bottom), (0, bottom)], fill=255)
    return big.reduce(s)


def _background_pixels(background: Background, width: int, height: int) -> np.ndarray:
    base = np.array(background.base, dtype=np.float32)
    other = np.array(background.other, dtype=np.float32)
    ys, xs = np.mgrid[0:height, 0:width]
    coordinate = (ys, xs, xs + ys)[background.direction]
    if background.texture == "plain":
        weight = np.zeros((height, width), np.float32)
    elif background.texture == "stripes":
        weight = ((coordinate // max(1, background.period // 2)) % 2).astype(np.float32)
    elif background.texture == "checker":
        weight = ((xs // background.period + ys // background.period) % 2).astype(np.float32)
    elif background.texture == "gradient":
        weight = coordinate / max(1, coordinate.max())
    else:  # noise: base tone plus grey per-pixel noise
        noise = np.random.default_rng(background.seed).normal(0.0, 6.0, (height, width, 1))
        return np.clip(np.rint(base + noise), 0, 255).astype(np.uint8)
    pixels = base + weight[..., None] * (other - base)
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
