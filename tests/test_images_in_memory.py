"""Pictures given in memory (bytes, data: URLs, PIL images): short names in the prompt text, the
pictures beside it, and the replies of the same picture given as a path."""

from __future__ import annotations

import base64
import json
import pickle
import re

import numpy as np
import pytest
import torch
from PIL import Image

from qwenvl.images import ImageError, load_image
from qwenvl.in_memory_images import IMAGE_NAME, TextWithImages, find_image, image_name

QUESTION = "What is in the picture?"


@pytest.fixture(scope="module")
def picture_file(tmp_path_factory):
    """A small noisy picture, so that its features differ from those of any other picture."""
    pixels = np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    path = tmp_path_factory.mktemp("pictures") / "noise.png"
    Image.fromarray(pixels).save(path)
    return path


def every_form(path) -> dict[str, object]:
    """The same picture as a path, encoded bytes, a data URL and a PIL image."""
    data = path.read_bytes()
    return {
        "path": str(path),
        "bytes": data,
        "data URL": "data:image/png;base64," + base64.b64encode(data).decode(),
        "PIL image": Image.open(path),
    }


def ask(tokenizer, image, text: str = QUESTION) -> str:
    return tokenizer.from_list_format([{"image": image}, {"text": text}])


def test_a_picture_in_memory_is_named_by_a_digest(tokenizer, picture_file):
    path_query = ask(tokenizer, str(picture_file))
    assert type(path_query) is str and path_query == f"Picture 1: <img>{picture_file}</img>\n{QUESTION}"
    names = {}
    for form, image in every_form(picture_file).items():
        if form == "path":
            continue
        query = ask(tokenizer, image)
        assert isinstance(query, TextWithImages), form
        (name,) = query.images
        assert IMAGE_NAME.fullmatch(name) and query == f"Picture 1: <img>{name}</img>\n{QUESTION}"
        assert tokenizer.image_references(tokenizer.encode(query)) == [name]
        pixels = np.asarray(load_image(query.images[name]))
        assert np.array_equal(pixels, np.asarray(load_image(picture_file))), form
        names[form] = name
    # a data URL is kept as its bytes: both get the same name; another picture gets another one
    assert names["bytes"] == names["data URL"] == image_name(picture_file.read_bytes())
    assert ask(tokenizer, bytearray(picture_file.read_bytes())).images.keys() == {names["bytes"]}
    other = ask(tokenizer, Image.new("RGB", (24, 16), "red"))
    assert other.images.keys().isdisjoint(names.values())


def test_the_pictures_travel_with_the_text(tokenizer, picture_file):
    query = ask(tokenizer, picture_file.read_bytes(), "")
    for longer in (query + QUESTION, "Look. " + query, pickle.loads(pickle.dumps(query + QUESTION))):
        assert isinstance(longer, TextWithImages) and longer.images == query.images
    assert type(query.strip()) is str  # other string operations give plain text
    # a text element built by from_list_format brings its pictures along
    red = Image.new("RGB", (4, 4), "red")
    both = tokenizer.from_list_format([{"image": red}, {"text": query}])
    assert both.images.keys() == {image_name(red), *query.images}


def test_bad_pictures_are_named(tokenizer):
    with pytest.raises(ImageError, match=re.escape("'data:image/png;base64,@@@@'")):
        ask(tokenizer, "data:image/png;base64,@@@@")
    with pytest.raises(ImageError, match="unsupported reference type int"):
        ask(tokenizer, 42)


def test_a_name_without_its_picture_is_an_error_naming_it():
    name = image_name(b"some picture")
    assert find_image(name, {name: b"some picture"}) == b"some picture"
    assert find_image("images/a.png", {name: b"some picture"}) == "images/a.png"
    with pytest.raises(ImageError, match=f"'{name}'.*no picture of that name was given"):
        find_image(name, None)


def test_every_form_of_a_picture_gets_the_same_reply(tokenizer, tiny_model, picture_file):
    def greedy(query, history=None):
        return tiny_model.chat(tokenizer, query, history=history, do_sample=False, max_new_tokens=3)

    replies = {form: greedy(ask(tokenizer, image)) for form, image in every_form(picture_file).items()}
    assert len({reply for reply, _ in replies.values()}) == 1, replies
    # the next turn finds the picture in the history it was given back
    assert greedy("And now?", replies["bytes"][1])[0] == greedy("And now?", replies["path"][1])[0]


def test_every_form_of_a_picture_gives_the_same_logits(tokenizer, tiny_model, picture_file):
    """The tokens inside a span are replaced by the picture's features, so the same picture under
    another name runs exactly the same arithmetic: the logits are equal, bit for bit."""

    def last_logits(query: str) -> torch.Tensor:
        with torch.no_grad():
            return tiny_model(**tokenizer(query, return_tensors="pt")).logits[0, -1]

    expected = last_logits(ask(tokenizer, str(picture_file)))
    assert torch.equal(last_logits(ask(tokenizer, picture_file.read_bytes())), expected)
    assert not torch.equal(last_logits(ask(tokenizer, Image.new("RGB", (24, 16), "red"))), expected)


def test_tokenizer_output_hands_the_pictures_to_generate(tokenizer, tiny_model, picture_file):
    by_path = tokenizer(ask(tokenizer, str(picture_file)), return_tensors="pt")
    query = ask(tokenizer, picture_file.read_bytes())
    in_memory = tokenizer(query, return_tensors="pt").to("cpu")
    assert "images" not in by_path and in_memory["images"] == query.images

    def new_tokens(inputs) -> list[int]:
        out = tiny_model.generate(**inputs, do_sample=False, max_new_tokens=3)
        return out[0, inputs["input_ids"].shape[1] :].tolist()

    assert new_tokens(in_memory) == new_tokens(by_path)
    (name,) = query.images
    with pytest.raises(ImageError, match=name):
        tiny_model.generate(in_memory["input_ids"], do_sample=False, max_new_tokens=1)


def test_history_that_lost_its_pictures_is_an_error_naming_them(tokenizer, tiny_model, picture_file):
    query = ask(tokenizer, picture_file.read_bytes())
    (name,) = query.images
    history = json.loads(json.dumps([(query, "A picture.")]))  # stored as plain text
    with pytest.raises(ImageError, match=name):
        tiny_model.chat(tokenizer, "And now?", history=history, do_sample=False, max_new_tokens=1)
    with pytest.raises(ImageError, match=re.escape("<13 bytes>: not an image")):
        tiny_model.chat(tokenizer, ask(tokenizer, b"not a picture"), do_sample=False, max_new_tokens=1)


def test_boxes_are_drawn_on_a_picture_in_memory(tokenizer, picture_file):
    response = "<ref>noise</ref><box>(100,100),(900,900)</box>"
    history = [(ask(tokenizer, Image.open(picture_file)), "Noise.")]
    drawn = tokenizer.draw_bbox_on_latest_picture(response, history)
    assert drawn.size == (24, 16)
    assert not np.array_equal(np.asarray(drawn), np.asarray(load_image(picture_file)))
    with pytest.raises(ImageError, match=IMAGE_NAME.pattern):
        tokenizer.draw_bbox_on_latest_picture(response, [(str(history[0][0]), "Noise.")])
