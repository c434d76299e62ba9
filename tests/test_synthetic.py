"""The synthetic world: scenes, pictures, questions and the files written for training and evaluation."""

from __future__ import annotations

import itertools
import json
import random
import re
from pathlib import Path

import pytest

from qwenvl.grounding import Box, parse_boxes
from qwenvl.synthetic import (
    COLOUR_NAMES,
    KIND_NAMES,
    QUESTIONS,
    Scene,
    Shape,
    ask,
    generate_dataset,
    generate_eval_set,
    load_conversations,
    load_eval_items,
    possible_tasks,
    random_scene,
    render,
    user_turn,
)
from qwenvl.synthetic.__main__ import main as synthetic_main
from qwenvl.synthetic.scene import Background

SCENES = [random_scene(random.Random(seed)) for seed in range(300)]


def _disjoint(a, b) -> bool:
    return a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    generate_dataset(out, 40, seed=3, questions_per_scene=5)
    generate_eval_set(out, 20, seed=3)
    return out


@pytest.fixture(scope="module")
def records(train_dir) -> list[dict]:
    return json.loads((train_dir / "train.json").read_text(encoding="utf-8"))


def _turns(records):
    """(language, user question without the picture, assistant answer) for every turn."""
    for record in records:
        conversation = record["conversations"]
        language = "zh" if re.search(r"[\u4e00-\u9fff]", conversation[1]["value"]) else "en"
        for user, assistant in zip(conversation[0::2], conversation[1::2], strict=True):
            yield language, user["value"].split("\n", 1)[-1], assistant["value"]


# -- scenes and pictures ---------------------------------------------------------------------------


def test_shapes_inside_the_picture_and_apart():
    for scene in SCENES:
        assert 1 <= len(scene.shapes) <= 3
        assert 256 <= scene.width <= 640 and 256 <= scene.height <= 640
        boxes = [shape.box for shape in scene.shapes] + [label.box for label in scene.labels]
        for x1, y1, x2, y2 in boxes:
            assert 0 < x1 < x2 < scene.width and 0 < y1 < y2 < scene.height
        for a, b in itertools.combinations(boxes, 2):
            assert _disjoint(a, b), (scene, a, b)


def test_sizes_and_aspect_ratios_vary():
    ratios = [scene.width / scene.height for scene in SCENES]
    assert min(ratios) < 0.75 and max(ratios) > 1.4
    assert len({scene.size for scene in SCENES}) > 200
    assert {len(scene.shapes) for scene in SCENES} == {1, 2, 3}
    assert {scene.background.texture for scene in SCENES} == {
        "plain",
        "stripes",
        "noise",
        "gradient",
        "checker",
    }


def test_no_ambiguous_references():
    for scene in SCENES:
        kinds = [shape.kind for shape in scene.shapes]
        assert len(set(kinds)) == len(kinds)  # hence (colour, kind) pairs are unique too


def test_normalized_box_maps_back_to_the_pixel_box():
    for scene in SCENES:
        for shape in scene.shapes:
            normalized = shape.normalized_box(scene.width, scene.height)
            assert all(0 <= v <= 1000 for v in normalized)
            back = Box(None, normalized).to_pixels(scene.width, scene.height)
            assert max(abs(p - q) for p, q in zip(back, shape.box, strict=True)) <= 2, (shape, back)


def test_render_draws_shapes_in_their_colours_on_a_light_background():
    scene = SCENES[0]
    image = render(scene)
    assert image.mode == "RGB" and image.size == scene.size
    for shape in scene.shapes:
        x1, y1, x2, y2 = shape.box
        centre = image.getpixel(((x1 + x2) // 2, y1 + (y2 - y1) * 2 // 3))  # inside a triangle too
        assert max(abs(c - r) for c, r in zip(centre, shape.rgb, strict=True)) <= 2
    corner = image.getpixel((1, 1))
    assert min(corner) >= 180


def test_render_fixed_size_and_custom_scene():
    scene = random_scene(random.Random(1), (300, 500))
    assert scene.size == (300, 500)
    background = Background("plain", (240, 240, 240), (230, 230, 230), 20, 0, 0)
    square = Shape("square", "blue", (10, 20, 60, 70), (30, 80, 210))
    image = render(Scene(100, 100, background, (square,)))
    assert image.getpixel((10, 20)) == (30, 80, 210) and image.getpixel((59, 69)) == (30, 80, 210)
    assert image.getpixel((9, 20)) == (240, 240, 240) and image.getpixel((60, 69)) == (240, 240, 240)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="hexagon"):
        Shape("hexagon", "red", (0, 0, 5, 5), (0, 0, 0))
    with pytest.raises(ValueError, match="purple"):
        Shape("circle", "purple", (0, 0, 5, 5), (0, 0, 0))
    with pytest.raises(ValueError, match="max_shapes"):
        random_scene(random.Random(0), max_shapes=4)


# -- questions and answers -------------------------------------------------------------------------


def test_required_phrasings_for_a_red_circle():
    scene = next(s for s in SCENES if any((x.colour, x.kind) == ("red", "circle") for x in s.shapes))
    seen = set()
    for seed in range(60):
        rng = random.Random(seed)
        for task in possible_tasks(scene):
            for language in ("zh", "en"):
                qa = ask(scene, task, language, rng, canonical=True)
                seen.add((qa.question, qa.answer if task != "grounding" else qa.answer.split("<box>")[0]))
    assert ("框出图中的红色圆形", "<ref>红色圆形</ref>") in seen
    assert ("Box the red circle.", "<ref>the red circle</ref>") in seen
    assert ("圆形是什么颜色？", "圆形是红色的。") in seen
    assert ("What colour is the circle?", "The circle is red.") in seen
    assert ("What color is the circle?", "The circle is red.") in seen
    count = len(scene.shapes)
    assert ("图中有几个图形？", f"图中有{count}个图形。") in seen
    assert any(q == "How many shapes are there?" and str(count) in a for q, a in seen)
    assert any(q == "描述画面内容。" and "一个红色圆形" in a for q, a in seen)
    assert any(q == "Describe the picture." and "a red circle" in a for q, a in seen)


def test_shape_question_and_answer():
    scene = Scene(
        400,
        300,
        Background("plain", (240, 240, 240), (230, 230, 230), 20, 0, 0),
        (
            Shape("circle", "red", (20, 20, 80, 80), (220, 30, 40)),
            Shape("square", "blue", (200, 20, 260, 80), (0, 0, 0)),
        ),
    )
    zh = [ask(scene, "shape", "zh", random.Random(s), canonical=True) for s in range(20)]
    en = [ask(scene, "shape", "en", random.Random(s), canonical=True) for s in range(20)]
    assert ("红色的图形是什么形状？", "红色的图形是圆形。") in {(q.question, q.answer) for q in zh}
    assert ("What shape is the red object?", "The red shape is a circle.") in {
        (q.question, q.answer) for q in en
    }
    caption = ask(scene, "caption", "en", random.Random(0), canonical=True)
    assert caption.answer == "There is a red circle and a blue square."
    assert ask(scene, "caption", "zh", random.Random(0)).answer == "图中有一个红色圆形和一个蓝色正方形。"


def test_shape_task_needs_a_colour_of_one_shape():
    background = Background("plain", (240, 240, 240), (230, 230, 230), 20, 0, 0)
    shapes = (
        Shape("circle", "red", (20, 20, 80, 80), (220, 30, 40)),
        Shape("square", "red", (200, 20, 260, 80), (0, 0, 0)),
    )
    scene = Scene(400, 300, background, shapes)
    assert "shape" not in possible_tasks(scene)
    with pytest.raises(ValueError, match="shape"):
        ask(scene, "shape", "en", random.Random(0))
    with pytest.raises(ValueError, match="fr"):
        ask(scene, "count", "fr", random.Random(0))


def test_every_canonical_phrasing_appears_in_a_generated_set(records):
    questions = {(language, question) for language, question, _ in _turns(records)}
    for task, by_language in QUESTIONS.items():
        for language, phrasings in by_language.items():
            for template in phrasings.canonical:
                pattern = re.escape(template)
                for name in ("target", "kind", "colour"):
                    pattern = pattern.replace(re.escape("{" + name + "}"), ".+")
                assert any(lang == language and re.fullmatch(pattern, q) for lang, q in questions), (
                    task,
                    template,
                )
    # several phrasings per task and language, not just the canonical ones
    assert len({q for lang, q in questions if lang == "en"}) > 30
    assert len({q for lang, q in questions if lang == "zh"}) > 30


def test_replies_parse_and_chinese_answers_use_chinese_names(records):
    grounding = 0
    for language, _question, answer in _turns(records):
        boxes = parse_boxes(answer)
        if "<box>" in answer:
            grounding += 1
            assert len(boxes) == 1 and boxes[0].kind == "box"
            assert all(0 <= v <= 1000 for v in boxes[0].coords)
            if language == "en":
                assert boxes[0].phrase.startswith("the ")
        else:
            assert boxes == []
        if language == "zh":
            assert not re.search(
                r"[A-Za-z]",
                answer.replace("<ref>", "").replace("</ref>", "").replace("<box>", "").replace("</box>", ""),
            )
            names = [*COLOUR_NAMES["zh"].values(), *KIND_NAMES["zh"].values()]
            assert any(name in answer for name in names) or re.search(r"\d", answer)
    assert grounding > 50


def test_user_turn_is_the_tokenizers_list_format(records, tokenizer):
    assert user_turn("images/a b.png", "框出图中的红色圆形") == tokenizer.from_list_format(
        [{"image": "images/a b.png"}, {"text": "框出图中的红色圆形"}]
    )
    for record in records:
        first = record["conversations"][0]["value"]
        image = re.match(r"Picture 1: <img>(.*?)</img>\n", first).group(1)
        question = first.split("\n", 1)[1]
        assert first == tokenizer.from_list_format([{"image": image}, {"text": question}])
        for later in record["conversations"][2::2]:
            assert "<img>" not in later["value"]


def test_some_conversations_are_multi_turn(records):
    lengths = [len(record["conversations"]) for record in records]
    assert set(lengths) <= {2, 4, 6}
    assert 0.6 < lengths.count(2) / len(lengths) < 0.97
    assert [r["conversations"][0]["from"] for r in records] == ["user"] * len(records)


def test_max_turns_allows_one_turn_per_task(tmp_path):
    path = generate_dataset(tmp_path, 30, seed=5, questions_per_scene=2, multi_turn=1.0, max_turns=5)
    records = json.loads(path.read_text(encoding="utf-8"))
    turns = [len(record["conversations"]) // 2 for record in records]
    assert set(turns) <= {2, 3, 4, 5} and max(turns) >= 4
    for record in records:  # later turns ask about other tasks, never the same one twice
        answers = [turn["value"] for turn in record["conversations"][1::2]]
        assert sum("<box>" in answer for answer in answers) <= 1
    with pytest.raises(ValueError, match="max_turns"):
        generate_dataset(tmp_path / "bad", 1, max_turns=1)


def test_task_repeats_let_a_task_recur(tmp_path):
    path = generate_dataset(tmp_path, 30, seed=5, multi_turn=1.0, max_turns=7, task_repeats=3)
    records = json.loads(path.read_text(encoding="utf-8"))
    boxes = [sum("<box>" in t["value"] for t in r["conversations"][1::2]) for r in records]
    assert max(boxes) >= 2 and max(boxes) <= 3
    with pytest.raises(ValueError, match="task_repeats"):
        generate_dataset(tmp_path / "bad", 1, task_repeats=0)


# -- files -----------------------------------------------------------------------------------------


def test_same_seed_same_bytes(tmp_path, train_dir):
    again = tmp_path / "again"
    generate_dataset(again, 40, seed=3, questions_per_scene=5)
    generate_eval_set(again, 20, seed=3)
    for name in ("train.json", "eval.json"):
        assert (again / name).read_bytes() == (train_dir / name).read_bytes()
    names = sorted(p.name for p in (train_dir / "images").iterdir())
    assert names == sorted(p.name for p in (again / "images").iterdir()) and len(names) == 60
    for name in names:
        assert (again / "images" / name).read_bytes() == (train_dir / "images" / name).read_bytes()
    other = tmp_path / "other"
    generate_dataset(other, 2, seed=4)
    assert (other / "images/train_000000.png").read_bytes() != (
        train_dir / "images/train_000000.png"
    ).read_bytes()


def test_loaders_resolve_image_paths_against_the_json_folder(train_dir, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # not the data folder
    records = load_conversations(train_dir / "train.json")
    image = re.search(r"<img>(.*?)</img>", records[0]["conversations"][0]["value"]).group(1)
    assert Path(image).is_absolute() and Path(image).is_file()
    items = load_eval_items(train_dir / "eval.json")
    assert all(Path(item["image"]).is_file() for item in items)


def test_eval_items_record_the_truth(train_dir):
    items = load_eval_items(train_dir / "eval.json")
    assert {item["task"] for item in items} == {"grounding", "count", "colour", "shape", "caption"}
    assert {item["language"] for item in items} == {"zh", "en"}
    assert len({item["id"] for item in items}) == len(items)
    for item in items:
        truth = item["truth"]
        if item["task"] == "grounding":
            assert list(parse_boxes(item["answer"])[0].coords) == truth["box"]
            width, height = truth["size"]
            assert Box(None, tuple(truth["box"])).to_pixels(width, height) == pytest.approx(
                truth["pixel_box"], abs=2
            )
        elif item["task"] == "count":
            assert str(truth["count"]) in item["answer"]
        elif item["task"] == "caption":
            assert 1 <= len(truth["shapes"]) <= 3


def test_command_line(tmp_path, capsys):
    out = tmp_path / "cli"
    assert (
        synthetic_main(
            ["--out", str(out), "--scenes", "3", "--seed", "1", "--eval-scenes", "2", "--languages", "en"]
        )
        == 0
    )
    assert "train.json" in capsys.readouterr().out
    records = json.loads((out / "train.json").read_text(encoding="utf-8"))
    assert len(records) == 9
    assert all(not re.search(r"[\u4e00-\u9fff]", json.dumps(r, ensure_ascii=False)) for r in records)
    assert len(list((out / "images").glob("eval_*.png"))) == 2
    with pytest.raises(SystemExit):
        synthetic_main(["--out", str(out), "--languages", "fr"])
