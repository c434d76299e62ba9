"""The tokenizer against the original's recorded behaviour (golden cases), plus its own contract."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from PIL import Image, ImageFont

from qwenvl import QwenVLTokenizer
from qwenvl.grounding import load_label_font
from qwenvl.tokenizer import IMAGE_SPAN


def encode_cases(cases):
    return [c for c in cases["tokenizer"]["encode"] if "error" not in c]


def test_vocabulary_size_and_special_ids(tokenizer, golden_cases):
    golden = golden_cases["tokenizer"]
    assert len(tokenizer) == golden["len"] == 151860
    for name, value in golden["special_ids"].items():
        assert getattr(tokenizer, name) == value, name
    assert list(tokenizer.IMAGE_ST) == golden["IMAGE_ST"]


def test_encode_and_decode_match_the_original(tokenizer, golden_cases):
    for case in encode_cases(golden_cases):
        text = case["text"]
        assert tokenizer.encode(text) == case["ids"], text
        assert tokenizer.encode(text, allowed_special=set(tokenizer.IMAGE_ST)) == case["ids_chat"], text
        assert tokenizer.decode(case["ids"]) == case["decode"], text
        assert tokenizer.decode(case["ids"], skip_special_tokens=True) == case["decode_skip_special"], text
        kept = tokenizer.decode(case["ids"], skip_special_tokens=True, keep_image_special=True)
        assert kept == case["decode_keep_image_special"], text


def test_image_span_is_always_258_ids(tokenizer):
    ids = tokenizer.encode("<img>a.png</img>")
    assert len(ids) == IMAGE_SPAN + 2
    assert ids[0] == tokenizer.img_start_id and ids[-1] == tokenizer.img_end_id
    assert ids[1:6] == list(b"a.png")
    assert ids[6:-1] == [tokenizer.img_pad_id] * (IMAGE_SPAN - 5)
    assert tokenizer.decode(ids) == "<img>a.png</img>"


def test_image_references_read_back_every_span(tokenizer):
    ids = tokenizer.encode("Picture 1: <img>a.png</img>\nPicture 2: <img>https://x/图.jpg</img>\nhi")
    assert tokenizer.image_references(ids) == ["a.png", "https://x/图.jpg"]
    full = tokenizer.encode("<img>" + "x" * 256 + "</img>")  # no pad: the span ends at </img>
    assert tokenizer.image_references(full) == ["x" * 256]
    broken = list(ids)
    broken[ids.index(tokenizer.img_start_id) + 1] = tokenizer.im_start_id
    with pytest.raises(ValueError, match="does not hold a reference"):
        tokenizer.image_references(broken)


def test_unclosed_image_tag_raises(tokenizer):
    with pytest.raises(ValueError, match="Unclosed image token"):
        tokenizer.encode("<img>unclosed image tag and text")


def test_image_reference_over_256_bytes_raises(tokenizer):
    with pytest.raises(ValueError, match="too long"):
        tokenizer.encode("<img>" + "x" * 257 + "</img>")
    assert len(tokenizer.encode("<img>" + "x" * 256 + "</img>")) == IMAGE_SPAN + 2


def test_text_is_nfc_normalized(tokenizer):
    assert tokenizer.encode("Cafe\u0301") == tokenizer.encode("Caf\u00e9")


def test_list_format_both_ways(tokenizer, golden_cases):
    for case in golden_cases["tokenizer"]["from_list_format"]:
        assert tokenizer.from_list_format(case["list"]) == case["text"]
    for case in golden_cases["tokenizer"]["to_list_format"]:
        assert tokenizer.to_list_format(case["text"]) == case["list"]


def test_from_list_format_rejects_unknown_elements(tokenizer):
    with pytest.raises(ValueError, match="video"):
        tokenizer.from_list_format([{"video": "clip.mp4"}])


def test_original_box_extraction_and_latest_picture(tokenizer, golden_cases):
    for case in golden_cases["tokenizer"]["boxes_with_ref"]:
        expected = [dict(b, box=tuple(b["box"])) for b in case["boxes"]]
        assert tokenizer._fetch_all_box_with_ref(case["text"]) == expected
    for case in golden_cases["tokenizer"]["latest_picture"]:
        history = [tuple(turn) for turn in case["history"]]
        assert tokenizer._fetch_latest_picture(case["response"], history) == case["image"]


def test_tokens_round_trip(tokenizer):
    text = "Hello <ref>猫</ref> world"
    tokens = tokenizer.tokenize(text)
    assert tokens[0] == b"Hello" and "<ref>" in tokens
    assert tokenizer.convert_tokens_to_ids(tokens) == tokenizer.encode(text)
    assert tokenizer.convert_tokens_to_string(tokens) == text
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == tokenizer.im_end_id


def test_call_returns_padded_tensors(tokenizer):
    batch = tokenizer(["a b c", "a"], return_tensors="pt")
    assert batch["input_ids"].shape == (2, 3)
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    single = tokenizer("The capital of France is", return_tensors="pt")
    assert single["input_ids"].tolist() == [tokenizer.encode("The capital of France is")]


def test_save_and_load_again(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    again = QwenVLTokenizer.from_pretrained(tmp_path)
    text = "Picture 1: <img>a.png</img>\n你好 <|im_start|>"
    assert again.encode(text) == tokenizer.encode(text)
    assert (tmp_path / "qwen.tiktoken").read_bytes() == open(tokenizer.vocab_file, "rb").read()


def test_folder_without_vocabulary_uses_the_packaged_one(tmp_path):
    tok = QwenVLTokenizer.from_pretrained(tmp_path)
    assert len(tok) == 151860


def test_pickles(tokenizer):
    again = pickle.loads(pickle.dumps(tokenizer))
    assert again.encode("你好 world") == tokenizer.encode("你好 world")


def test_auto_tokenizer_returns_ours_without_remote_code(tiny_checkpoint):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_checkpoint)
    assert isinstance(tok, QwenVLTokenizer)
    assert tok.encode("Hello, world!") == [9707, 11, 1879, 0]


# -- drawing on the latest picture ------------------------------------------------------------------


def test_draw_bbox_on_latest_picture(tokenizer, tmp_path):
    width, height = 640, 480
    picture = tmp_path / "plain.png"
    Image.new("RGB", (width, height), "white").save(picture)
    history = [
        (tokenizer.from_list_format([{"image": str(picture)}, {"text": "描述画面内容。"}]), "一张白纸。")
    ]
    response = "<ref>真人</ref><box>(21,29),(526,837)</box>"

    drawn = tokenizer.draw_bbox_on_latest_picture(response, history)

    assert drawn.size == (width, height)
    pixels = np.asarray(drawn)
    x1, y1, x2, y2 = (
        int(21 / 1000 * width),
        int(29 / 1000 * height),
        int(526 / 1000 * width),
        int(837 / 1000 * height),
    )
    mid_y, mid_x = (y1 + y2) // 2, (x1 + x2) // 2
    white = np.array([255, 255, 255])
    for y, x in ((mid_y, x1), (mid_y, x2), (y2, mid_x)):  # left, right and bottom edges
        assert not (pixels[y, x] == white).all(), (x, y)
    assert (pixels[mid_y, x1 - 1] == white).all() and (pixels[mid_y, x2 + 1] == white).all()
    assert (pixels[y2 + 1, mid_x] == white).all()
    assert (pixels[mid_y, mid_x] == white).all()  # an outline, not a filled box


def test_label_glyphs_are_real_chinese_not_tofu():
    font = load_label_font(32)
    real = [np.asarray(font.getmask(ch)) for ch in "真人"]
    tofu = np.asarray(font.getmask("\ue000"))  # a private-use code point: the font's notdef glyph
    assert all(mask.size and mask.any() for mask in real)
    assert not np.array_equal(real[0], real[1])
    assert all(mask.shape != tofu.shape or not np.array_equal(mask, tofu) for mask in real)
    fallback = np.asarray(ImageFont.load_default().getmask("真"))
    assert fallback.shape != real[0].shape or not np.array_equal(fallback, real[0])


def test_no_picture_or_no_box_gives_none(tokenizer):
    assert tokenizer.draw_bbox_on_latest_picture("<box>(1,2),(3,4)</box>", [("no image", "x")]) is None
    assert tokenizer.draw_bbox_on_latest_picture("no box", [("Picture 1: <img>a.png</img>\n", "x")]) is None


def test_ids_past_the_tokenizer_decode_to_nothing(tokenizer):
    """The model's vocabulary is padded to 151,936; those ids have no text."""
    ids = tokenizer.encode("a b") + [151900]
    assert tokenizer.decode(ids) == "a b"
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a b"
