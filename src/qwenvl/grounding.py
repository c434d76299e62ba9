"""Grounding output: ``<ref>``/``<box>``/``<quad>`` parsing, pixel boxes, drawing.

Coordinates in the model's text are integers normalized to 0..1000 of the image width and
height. A ``<ref>phrase</ref>`` names every box that follows it, up to the next ``<ref>``.
"""

from __future__ import annotations

import functools
import io
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Literal

from PIL import Image, ImageDraw, ImageFont

RGB = tuple[int, int, int]

# matplotlib's Tableau 10 ("tab:blue", "tab:orange", ...), the palette the original picks from.
PALETTE: tuple[RGB, ...] = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
)
BLACK: RGB = (0, 0, 0)
WHITE: RGB = (255, 255, 255)
FONT_RESOURCE = "assets/fonts/wqy-microhei-gb2312.ttf"

# One pass over the text keeps refs and boxes in order; DOTALL because phrases may hold newlines.
_TAG = re.compile(r"<ref>(?P<phrase>.*?)</ref>|<(?P<kind>box|quad)>(?P<body>.*?)</(?P=kind)>", re.DOTALL)
_POINT = r"\(\s*(\d+)\s*,\s*(\d+)\s*\)"
_POINTS = {
    "box": re.compile(rf"\s*{_POINT}\s*,\s*{_POINT}\s*"),
    "quad": re.compile(rf"\s*{_POINT}\s*,\s*{_POINT}\s*,\s*{_POINT}\s*,\s*{_POINT}\s*"),
}


@dataclass(frozen=True)
class Box:
    """A box ``(x1, y1, x2, y2)`` or a quad ``(x1, y1, ..., x4, y4)`` in 0..1000 coordinates."""

    phrase: str | None
    coords: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.coords) not in (4, 8):
            raise ValueError(f"a box has 4 coordinates and a quad 8, got {len(self.coords)}: {self.coords}")

    @property
    def kind(self) -> Literal["box", "quad"]:
        return "box" if len(self.coords) == 4 else "quad"

    def to_pixels(self, width: int, height: int) -> tuple[int, ...]:
        """Pixel coordinates, truncated as the original does: ``int(x / 1000 * W)``."""
        sizes = (width, height)
        return tuple(int(value / 1000 * sizes[index % 2]) for index, value in enumerate(self.coords))


def parse_boxes(text: str) -> list[Box]:
    """Every well-formed ``<box>``/``<quad>`` in ``text``, named by the latest ``<ref>`` before it.

    Malformed contents (wrong count, non-integers) are skipped: model output must not crash this.
    """
    boxes: list[Box] = []
    phrase: str | None = None
    for match in _TAG.finditer(text):
        if match.group("phrase") is not None:
            phrase = match.group("phrase")
            continue
        points = _POINTS[match.group("kind")].fullmatch(match.group("body"))
        if points is not None:
            boxes.append(Box(phrase, tuple(int(value) for value in points.groups())))
    return boxes


def assign_colors(boxes: Iterable[Box]) -> dict[str | None, RGB]:
    """One palette colour per phrase (boxes without a phrase share one), in order of appearance."""
    colors: dict[str | None, RGB] = {}
    for box in boxes:
        if box.phrase not in colors:
            colors[box.phrase] = PALETTE[len(colors) % len(PALETTE)]
    return colors


def relative_luminance(color: RGB) -> float:
    """WCAG 2's relative luminance of an sRGB colour: 0 for black, 1 for white."""

    def linear(channel: int) -> float:
        value = channel / 255
        return value / 12.92 if value <= 0.04045 else ((value + 0.055) / 1.055) ** 2.4

    red, green, blue = (linear(channel) for channel in color)
    return 0.2126 * red + 0.7152 * green + 0.0722 * blue


def contrast_ratio(first: RGB, second: RGB) -> float:
    """WCAG 2's contrast ratio, from 1 (the same luminance) to 21 (black on white)."""
    darker, lighter = sorted((relative_luminance(first), relative_luminance(second)))
    return (lighter + 0.05) / (darker + 0.05)


def label_text_color(background: RGB) -> RGB:
    """Black or white, whichever contrasts more with ``background``: at least 4.58:1 on any colour."""
    return BLACK if contrast_ratio(background, BLACK) >= contrast_ratio(background, WHITE) else WHITE


def default_line_width(width: int, height: int) -> int:
    return max(1, round(math.sqrt(width * height) / 200))


def default_font_size(width: int, height: int) -> int:
    # The original's label size: max(sqrt(H * W) // 30, 15).
    return max(int(math.sqrt(width * height) // 30), 15)


def draw_boxes(
    image: Image.Image,
    boxes: Sequence[Box],
    *,
    line_width: int | None = None,
    font_size: int | None = None,
) -> Image.Image:
    """A new RGB image with ``boxes`` outlined and labelled; ``image`` is left untouched.

    A box's outline is drawn inward from its pixel coordinates, so its outer edge lies exactly on
    them. Each phrase gets one colour; as in the original, its label is written once per run of
    boxes with that phrase, at the first box of the run.
    """
    canvas = image.convert("RGB")  # convert() always copies, even from RGB
    width, height = canvas.size
    line_width = line_width or default_line_width(width, height)
    font = load_label_font(font_size or default_font_size(width, height))
    colors = assign_colors(boxes)
    draw = ImageDraw.Draw(canvas)
    for box in boxes:
        _draw_outline(draw, box.to_pixels(width, height), colors[box.phrase], line_width)
    # Labels go on top of every outline, so a later box never hides an earlier label.
    previous: str | None = None
    for box in boxes:
        if box.phrase and box.phrase != previous:  # an empty <ref></ref> gets a colour, no label
            corner = _top_left(box.to_pixels(width, height))
            _draw_label(draw, width, box.phrase, corner, colors[box.phrase], font, line_width)
        previous = box.phrase
    return canvas


def _draw_outline(draw: ImageDraw.ImageDraw, pixels: tuple[int, ...], color: RGB, line_width: int) -> None:
    if len(pixels) == 4:
        x1, y1, x2, y2 = pixels
        # Pillow refuses x2 < x1; a model may write the corners in either order.
        rectangle = (min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2))
        draw.rectangle(rectangle, outline=color, width=line_width)
    else:
        points = list(zip(pixels[0::2], pixels[1::2], strict=True))
        draw.polygon(points, outline=color, width=line_width)


def _top_left(pixels: tuple[int, ...]) -> tuple[int, int]:
    return min(pixels[0::2]), min(pixels[1::2])


def _draw_label(
    draw: ImageDraw.ImageDraw,
    image_width: int,
    text: str,
    corner: tuple[int, int],
    color: RGB,
    font: ImageFont.FreeTypeFont,
    line_width: int,
) -> None:
    """Black or white text on a panel of the box colour: above the corner if it fits, else just inside."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    padding = max(1, font.size // 8)
    panel_width = right - left + 2 * padding
    panel_height = bottom - top + 2 * padding
    x, y = corner
    if y - panel_height >= 0:
        y -= panel_height
    else:
        x, y = x + line_width, y + line_width
    x = max(0, min(x, image_width - panel_width))
    draw.rectangle((x, y, x + panel_width - 1, y + panel_height - 1), fill=color)
    draw.text((x + padding - left, y + padding - top), text, font=font, fill=label_text_color(color))


@functools.lru_cache(maxsize=1)
def _font_bytes() -> bytes:
    # Read through importlib.resources so the font is found inside wheels and zip installs too.
    return resources.files("qwenvl").joinpath(FONT_RESOURCE).read_bytes()


def load_label_font(size: int) -> ImageFont.FreeTypeFont:
    """The shipped WenQuanYi Micro Hei subset (Latin and GB2312 Chinese) at ``size`` pixels."""
    # A fresh face per call (about a millisecond): FreeType faces must not be shared across threads.
    return ImageFont.truetype(io.BytesIO(_font_bytes()), size)
