"""<ref>/<box>/<quad> parsing, pixel conversion (SPEC section 3) and drawing."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image, ImageDraw

from qwenvl.grounding import (
    BLACK,
    PALETTE,
    WHITE,
    Box,
    assign_colors,
    contrast_ratio,
    default_font_size,
    default_line_width,
    draw_boxes,
    label_text_color,
    load_label_font,
    parse_boxes,
    relative_luminance,
)

# --- parsing -----------------------------------------------------------------------------------


def test_a_ref_names_every_box_until_the_next_ref():
    text = (
        "<box>(1,2),(3,4)</box> then <ref>two dogs</ref><box>(10,20),(30,40)</box>"
        "<box>(50,60),(70,80)</box> and <ref>a cat</ref><box>(5,6),(7,8)</box>"
    )
    assert parse_boxes(text) == [
        Box(None, (1, 2, 3, 4)),
        Box("two dogs", (10, 20, 30, 40)),
        Box("two dogs", (50, 60, 70, 80)),
        Box("a cat", (5, 6, 7, 8)),
    ]


def test_quads_and_spaces():
    text = "<ref>sign</ref><quad>( 1, 2 ),(3 ,4), (5,6),(7,8)</quad><box> (0,0) , (1000,1000) </box>"
    boxes = parse_boxes(text)
    assert boxes == [Box("sign", (1, 2, 3, 4, 5, 6, 7, 8)), Box("sign", (0, 0, 1000, 1000))]
    assert [box.kind for box in boxes] == ["quad", "box"]


def test_chinese_phrases():
    assert parse_boxes("图中<ref>真人</ref><box>(21,29),(526,837)</box>") == [Box("真人", (21, 29, 526, 837))]


@pytest.mark.parametrize(
    "text",
    [
        "",
        "no grounding here",
        "<ref>a phrase without a box</ref>",
        "<box>(1,2)</box>",
        "<box>(1,2),(3,4),(5,6)</box>",
        "<box>(a,b),(c,d)</box>",
        "<box>(1.5,2),(3,4)</box>",
        "<box>(-1,2),(3,4)</box>",
        "<box>(1,2),(3,4)",
        "<box>(1,2)(3,4)</box>",
        "<quad>(1,2),(3,4)</quad>",
        "<box>(1,2),(3,4)</quad>",
    ],
)
def test_no_or_malformed_boxes_give_nothing(text):
    assert parse_boxes(text) == []


def test_malformed_boxes_are_skipped_and_the_rest_kept():
    text = "<ref>x</ref><box>(1,2)</box><box>(oops)</box><box>(1,2),(3,4)</box>"
    assert parse_boxes(text) == [Box("x", (1, 2, 3, 4))]


def test_box_needs_four_or_eight_coordinates():
    with pytest.raises(ValueError, match="got 3"):
        Box(None, (1, 2, 3))


# --- pixels ------------------------------------------------------------------------------------


def test_to_pixels_follows_the_spec_formula():
    x1, y1, x2, y2 = 21, 29, 526, 837
    assert Box(None, (x1, y1, x2, y2)).to_pixels(640, 480) == (13, 13, 336, 401)
    for width, height in [(640, 480), (720, 1280), (1, 1), (999, 333)]:
        expected = (
            int(x1 / 1000 * width),
            int(y1 / 1000 * height),
            int(x2 / 1000 * width),
            int(y2 / 1000 * height),
        )
        assert Box(None, (x1, y1, x2, y2)).to_pixels(width, height) == expected


def test_to_pixels_truncates_the_float_like_the_original():
    # 175 / 1000 * 720 is 125.99999999999999 in floating point: the original gets 125, not 126.
    assert Box(None, (175, 175, 175, 175)).to_pixels(720, 720) == (125, 125, 125, 125)


def test_quad_pixels_alternate_width_and_height():
    assert Box(None, (500, 500, 1000, 0, 1000, 1000, 0, 1000)).to_pixels(200, 100) == (
        100,
        50,
        200,
        0,
        200,
        100,
        0,
        100,
    )


# --- drawing -----------------------------------------------------------------------------------


def pixel_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(int)


def test_box_outline_sits_exactly_on_the_pixel_coordinates():
    image = Image.new("RGB", (640, 480), WHITE)
    drawn = draw_boxes(image, parse_boxes("<ref>真人</ref><box>(21,29),(526,837)</box>"))
    x1, y1, x2, y2 = 13, 13, 336, 401
    width = default_line_width(640, 480)
    assert width == 3
    color = PALETTE[0]
    pixels = drawn.load()
    for x in (x1 + 100, x2 - 5):  # top and bottom edges, clear of the label
        for inset in range(width):
            assert pixels[x, y1 + inset] == color
            assert pixels[x, y2 - inset] == color
        assert pixels[x, y1 - 1] == WHITE and pixels[x, y2 + 1] == WHITE
        assert pixels[x, y1 + width] == WHITE and pixels[x, y2 - width] == WHITE
    for y in (y1 + 100, y2 - 5):  # left and right edges
        for inset in range(width):
            assert pixels[x1 + inset, y] == color
            assert pixels[x2 - inset, y] == color
        assert pixels[x1 - 1, y] == WHITE and pixels[x2 + 1, y] == WHITE
        assert pixels[x1 + width, y] == WHITE and pixels[x2 - width, y] == WHITE
    assert pixels[x1, y1] == color and pixels[x2, y2] == color
    assert pixels[x1 - 1, y1 - 1] == WHITE and pixels[x2 + 1, y2 + 1] == WHITE


def crop_to_ink(pixels: np.ndarray, background: tuple[int, int, int]) -> np.ndarray:
    ink = np.any(pixels != background, axis=-1)
    rows, cols = np.nonzero(ink)
    return pixels[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]


def label_mask(image: Image.Image, box: Box) -> np.ndarray:
    """Where ``box``'s label lies: the pixels that differ from the same box drawn without a phrase."""
    unlabelled = Box(None, box.coords)  # the first box's colour either way
    labelled = pixel_array(draw_boxes(image, [box]))
    return np.any(labelled != pixel_array(draw_boxes(image, [unlabelled])), axis=-1)


def test_label_is_contrasting_text_on_a_panel_of_the_box_colour():
    image = Image.new("RGB", (640, 480), WHITE)
    box = parse_boxes("<ref>真人</ref><box>(21,29),(526,837)</box>")[0]
    rows, cols = np.nonzero(label_mask(image, box))
    assert rows.size > 0, "no label drawn"
    # The box top edge is at y=13, too close to the top for the panel: it goes just inside.
    assert rows.min() >= 13 + 3 and cols.min() >= 13 + 3
    assert rows.max() < 13 + 60 and cols.max() < 13 + 120
    label = pixel_array(draw_boxes(image, [box]))[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    text_color = label_text_color(PALETTE[0])
    assert text_color == WHITE  # tab:blue is dark
    assert tuple(label[0, 0]) == PALETTE[0] and tuple(label[-1, -1]) == PALETTE[0]  # the panel's padding
    assert np.all(label == text_color, axis=-1).any(), "no pixel in the text colour"

    reference = Image.new("RGB", (200, 100), PALETTE[0])
    font = load_label_font(default_font_size(640, 480))
    ImageDraw.Draw(reference).text((20, 20), "真人", font=font, fill=text_color)
    expected = crop_to_ink(pixel_array(reference), PALETTE[0])
    assert np.array_equal(crop_to_ink(label, PALETTE[0]), expected)


@pytest.mark.parametrize("color", PALETTE)
def test_label_text_on_every_palette_colour_meets_wcag_aa(color):
    assert contrast_ratio(color, label_text_color(color)) >= 4.5  # AA for normal-size text


def test_label_text_is_black_or_white_by_luminance():
    assert relative_luminance(BLACK) == 0 and relative_luminance(WHITE) == pytest.approx(1)
    assert contrast_ratio(BLACK, WHITE) == pytest.approx(21)
    assert contrast_ratio(WHITE, BLACK) == pytest.approx(21)
    assert label_text_color(BLACK) == WHITE and label_text_color(WHITE) == BLACK
    assert label_text_color(PALETTE[1]) == BLACK  # tab:orange is light
    # The better of black and white is worst where both contrast equally: (L + 0.05) / 0.05 =
    # 1.05 / (L + 0.05), a ratio of sqrt(21) = 4.58. So any colour gets readable text; a grid of them:
    levels = range(0, 256, 51)
    for color in [(r, g, b) for r in levels for g in levels for b in levels]:
        assert contrast_ratio(color, label_text_color(color)) >= math.sqrt(21)


def test_shipped_font_has_real_chinese_glyphs():
    font = load_label_font(30)
    notdef = font.getmask("\ue000")  # a private-use code point: the font draws its missing-glyph box
    for char in "真人文字，":
        glyph = font.getmask(char)
        assert glyph.getbbox() is not None
        assert (glyph.getbbox(), bytes(glyph)) != (notdef.getbbox(), bytes(notdef)), char
    assert bytes(font.getmask("真")) != bytes(font.getmask("人"))


def test_label_goes_above_the_box_when_there_is_room():
    image = Image.new("RGB", (640, 480), WHITE)
    rows, cols = np.nonzero(label_mask(image, Box("dog", (100, 500, 400, 900))))
    assert rows.max() == 240 - 1 and cols.min() == 64


def test_one_colour_per_phrase_and_one_label_per_group():
    text = (
        "<ref>dog</ref><box>(100,100),(300,300)</box><box>(600,600),(900,900)</box>"
        "<ref>cat</ref><box>(400,100),(550,300)</box>"
    )
    boxes = parse_boxes(text) + [Box(None, (50, 700, 200, 950))]
    colors = assign_colors(boxes)
    assert list(colors) == ["dog", "cat", None]
    assert len(set(colors.values())) == 3
    image = Image.new("RGB", (1000, 1000), WHITE)
    pixels = draw_boxes(image, boxes, line_width=2).load()
    assert pixels[200, 300] == pixels[750, 900] == colors["dog"]  # bottom edges
    assert pixels[450, 300] == colors["cat"]
    assert pixels[100, 950] == colors[None]
    # A label panel ends just above its box's top left corner; (x + 2, top - 2) is in its padding.
    labelled = draw_boxes(image, boxes).load()
    assert labelled[102, 98] == colors["dog"] and labelled[402, 98] == colors["cat"]
    assert labelled[602, 598] == WHITE, "the second dog box is not labelled again"
    assert labelled[52, 698] == WHITE, "a box without a phrase has no label"


def test_empty_phrase_gets_no_label():
    image = Image.new("RGB", (200, 200), WHITE)
    drawn = draw_boxes(image, parse_boxes("<ref></ref><box>(100,500),(900,900)</box>"))
    assert drawn.tobytes() == draw_boxes(image, [Box(None, (100, 500, 900, 900))]).tobytes()
    assert drawn.getpixel((100, 180)) == PALETTE[0]


def test_colours_are_deterministic():
    boxes = parse_boxes("<ref>b</ref><box>(1,1),(2,2)</box><ref>a</ref><box>(1,1),(2,2)</box>")
    assert assign_colors(boxes) == {"b": PALETTE[0], "a": PALETTE[1]}
    image = Image.new("RGB", (64, 64), WHITE)
    assert draw_boxes(image, boxes).tobytes() == draw_boxes(image, boxes).tobytes()


def test_quad_outline_passes_through_its_corners():
    image = Image.new("RGB", (400, 400), WHITE)
    quad = Box(None, (100, 100, 900, 150, 800, 900, 150, 800))
    pixels = draw_boxes(image, [quad], line_width=1).load()
    for x, y in [(40, 40), (360, 60), (320, 360), (60, 320)]:
        assert pixels[x, y] == PALETTE[0]
    assert pixels[200, 200] == WHITE


def test_input_image_is_untouched_and_output_is_rgb():
    image = Image.new("RGBA", (120, 80), (10, 200, 30, 128))
    before = image.tobytes()
    drawn = draw_boxes(image, parse_boxes("<ref>thing</ref><box>(100,100),(900,900)</box>"))
    assert image.tobytes() == before and image.mode == "RGBA"
    assert drawn is not image and drawn.mode == "RGB" and drawn.size == image.size
    assert drawn.tobytes() != image.convert("RGB").tobytes()


def test_corners_in_either_order_and_no_boxes():
    image = Image.new("RGB", (100, 100), WHITE)
    assert draw_boxes(image, []).tobytes() == image.tobytes()
    flipped = draw_boxes(image, [Box(None, (900, 900, 100, 100))], line_width=1)
    assert flipped.tobytes() == draw_boxes(image, [Box(None, (100, 100, 900, 900))], line_width=1).tobytes()


def test_default_sizes_scale_with_the_image():
    assert default_font_size(640, 480) == 18  # max(sqrt(640 * 480) // 30, 15)
    assert default_font_size(100, 100) == 15
    assert default_line_width(10, 10) == 1
    assert default_line_width(2000, 2000) == 10
