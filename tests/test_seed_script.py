"""The original README's script, `import qwenvl` added and trust_remote_code removed, runs as documented."""

from __future__ import annotations

import json
import shutil

from tests.conftest import DATA

SEED_SCRIPT = """
import qwenvl
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation import GenerationConfig
import torch
torch.manual_seed(1234)
tokenizer = AutoTokenizer.from_pretrained("Qwen/Qwen-VL-Chat")
model = AutoModelForCausalLM.from_pretrained("Qwen/Qwen-VL-Chat", device_map="cpu").eval()
model.generation_config = GenerationConfig.from_pretrained("Qwen/Qwen-VL-Chat")
query = tokenizer.from_list_format([{'image': 'picture.jpg'}, {'text': '描述画面内容。'}])
response, history = model.chat(tokenizer, query=query, history=None)
response, history = model.chat(tokenizer, '框出图中的真人', history=history)
image = tokenizer.draw_bbox_on_latest_picture(response, history)
"""


def run_seed_script(model_folder: str) -> dict:
    scope: dict = {}
    exec(SEED_SCRIPT.replace("Qwen/Qwen-VL-Chat", model_folder), scope)  # noqa: S102 - the script under test
    return scope


def short_replies_checkpoint(checkpoint, folder):
    """The golden checkpoint with max_new_tokens 24: random weights never stop, and 512 sampled
    tokens over the whole vocabulary take minutes on CPU."""
    folder.mkdir()
    for item in checkpoint.iterdir():
        (folder / item.name).symlink_to(item)
    config = json.loads((checkpoint / "generation_config.json").read_text())
    (folder / "generation_config.json").unlink()
    (folder / "generation_config.json").write_text(json.dumps(dict(config, max_new_tokens=24)))
    return folder


def test_seed_script(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copy(DATA / "images" / "shapes.png", tmp_path / "picture.jpg")
    model_folder = str(short_replies_checkpoint(tiny_checkpoint, tmp_path / "model"))
    first = run_seed_script(model_folder)

    from qwenvl import QwenVLForCausalLM, QwenVLTokenizer

    assert isinstance(first["model"], QwenVLForCausalLM)
    assert isinstance(first["tokenizer"], QwenVLTokenizer)
    assert first["model"].generation_config.top_p == 0.3
    history = first["history"]
    assert [q for q, _ in history] == [first["query"], "框出图中的真人"]
    assert history[-1][1] == first["response"] and isinstance(first["response"], str)
    # random weights rarely produce a box; when they do, the picture comes back drawn
    assert first["image"] is None or first["image"].size == (448, 448)

    again = run_seed_script(model_folder)  # torch.manual_seed(1234) makes sampling repeat
    assert again["history"] == history
