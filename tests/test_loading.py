"""Loading and saving checkpoints: layouts, the real Qwen-VL-Chat layout, dtype and device, every bad
checkpoint, the Hugging Face cache, transformers' Auto classes and the save_pretrained round trip.

Checkpoints are small random ones with a reduced vocabulary: loading does not depend on the
vocabulary size, and generating 2,048 embedding rows instead of 151,936 keeps this file fast.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch

from qwenvl import QwenVLConfig, QwenVLForCausalLM, QwenVLTokenizer
from qwenvl.chat_format import CHAT_GENERATION_DEFAULTS
from qwenvl.hub import ModelNotFoundError
from qwenvl.loading import CheckpointError, PrecisionError, load_config, resolve_device, select_dtype
from qwenvl.random_checkpoint import build_checkpoint, random_state_dict, save_weights

from .conftest import DATA, small_config

SEED = 1234
CONFIG = small_config(vocab_size=2048)
REAL = DATA / "real-qwen-vl-chat"
OFFICIAL_MODEL_AUTO_MAP = {
    "AutoConfig": "configuration_qwen.QWenConfig",
    "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel",
}
OFFICIAL_TOKENIZER_AUTO_MAP = {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]}
HUB_ID = "Qwen/Qwen-VL-Chat"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
LAYOUTS = {  # name: (shards, format)
    "single-bin": (1, "bin"),
    "sharded-bin": (3, "bin"),
    "single-safetensors": (1, "safetensors"),
    "sharded-safetensors": (3, "safetensors"),
}
NON_WEIGHT_FILES = ("config.json", "generation_config.json", "tokenizer_config.json", "qwen.tiktoken")


# -- fixtures and helpers ---------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def network_attempts(monkeypatch) -> list:
    """Refuse and record every connection or name lookup: loading must work from local files alone."""
    attempts: list = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError(f"a test tried to reach the network: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    yield attempts
    assert not attempts, f"network access attempted: {attempts}"


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return random_state_dict(CONFIG, SEED)


@pytest.fixture(scope="module")
def layouts(tmp_path_factory, reference) -> dict[str, Path]:
    """One folder per weight layout, all holding `reference`; generated once for the module."""
    root = tmp_path_factory.mktemp("layouts")
    first = Path(build_checkpoint(CONFIG, str(root / "single-bin"), SEED))
    folders = {"single-bin": first}
    for name, (shards, fmt) in LAYOUTS.items():
        if name not in folders:
            folders[name] = copy_without_weights(first, root / name)
            save_weights(reference, str(folders[name]), shards=shards, fmt=fmt)
    return folders


@pytest.fixture(scope="module")
def base(layouts) -> Path:
    return layouts["single-bin"]


@pytest.fixture(scope="module")
def base_model(base) -> QwenVLForCausalLM:
    return QwenVLForCausalLM.from_pretrained(base, fp32=True)


def copy_without_weights(source: Path, target: Path) -> Path:
    target.mkdir(parents=True)
    for name in NON_WEIGHT_FILES:
        shutil.copy(source / name, target / name)
    return target


def copy_folder(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def assert_same_parameters(model: QwenVLForCausalLM, expected: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert sorted(state) == sorted(expected)
    different = [
        name for name in expected if not torch.equal(state[name], expected[name].to(state[name].dtype))
    ]
    assert not different, f"parameters differ: {different[:5]}"


def logits(model: QwenVLForCausalLM) -> torch.Tensor:
    ids = torch.tensor([[5, 17, 300, 2000, 42, 7, 1999, 0]])
    with torch.no_grad():
        return model(input_ids=ids).logits


# -- layouts ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_loads_the_same_parameters(layouts, reference, layout):
    model = QwenVLForCausalLM.from_pretrained(layouts[layout], fp32=True)
    assert_same_parameters(model, reference)


def test_sharded_layouts_have_an_index_and_their_shards(layouts):
    assert sorted(os.listdir(layouts["sharded-bin"])) == sorted(
        [*NON_WEIGHT_FILES, "pytorch_model.bin.index.json"]
        + [f"pytorch_model-0000{k}-of-00003.bin" for k in (1, 2, 3)]
    )
    index = json.loads((layouts["sharded-safetensors"] / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)}


# -- the real Qwen-VL-Chat layout, on the meta device -------------------------------------------------


@pytest.fixture(scope="module")
def real_meta_model() -> QwenVLForCausalLM:
    with torch.device("meta"):
        return QwenVLForCausalLM(load_config(str(REAL)))


def test_real_config_has_the_official_parameter_count(real_meta_model):
    assert sum(p.numel() for p in real_meta_model.parameters()) == 9_656_935_168


def test_real_config_has_the_official_names_and_shapes(real_meta_model):
    official = json.loads((DATA / "real_parameter_shapes.json").read_text())
    ours = {name: list(t.shape) for name, t in real_meta_model.state_dict().items()}
    assert ours == official


def test_real_index_names_exactly_the_model_parameters(real_meta_model):
    index = json.loads((REAL / "pytorch_model.bin.index.json").read_text())
    state = real_meta_model.state_dict()
    assert set(index["weight_map"]) == set(state)
    assert len(index["weight_map"]) == 853
    assert len(set(index["weight_map"].values())) == 10
    # the index's byte count is the bf16 size of exactly these parameters
    assert index["metadata"]["total_size"] == 2 * sum(t.numel() for t in state.values())


# -- dtype and device -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"fp32": True}, torch.float32),
        ({"bf16": True}, torch.bfloat16),
        ({"fp16": True}, torch.float16),
        ({"dtype": "bfloat16"}, torch.bfloat16),
        ({"torch_dtype": torch.float16}, torch.float16),
        ({"torch_dtype": "float16"}, torch.float16),
        ({"dtype": "auto"}, torch.float32),  # auto on CPU
        ({}, torch.float32),  # nothing asked, on CPU
    ],
    ids=repr,
)
def test_dtype_selection(base, reference, kwargs, expected):
    model = QwenVLForCausalLM.from_pretrained(base, **kwargs)
    assert {p.dtype for p in model.state_dict().values()} == {expected}
    assert model.dtype == expected
    assert_same_parameters(model, reference)


def test_two_precision_flags_are_refused_naming_both(base):
    with pytest.raises(ValueError, match="bf16, fp16"):
        QwenVLForCausalLM.from_pretrained(base, bf16=True, fp16=True)


def test_unknown_dtype_is_refused_naming_it(base):
    with pytest.raises(ValueError, match="'float12'"):
        QwenVLForCausalLM.from_pretrained(base, dtype="float12")


def test_config_precision_flag_applies_when_nothing_is_passed(base, tmp_path):
    folder = copy_folder(base, tmp_path / "bf16-config")
    edit_json(folder / "config.json", bf16=True)
    assert QwenVLForCausalLM.from_pretrained(folder).dtype == torch.bfloat16
    # an explicit choice wins over the config's flag
    assert QwenVLForCausalLM.from_pretrained(folder, fp32=True).dtype == torch.float32


def simulate_gpu(monkeypatch, name: str, capability: tuple[int, int], bf16: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)


@pytest.mark.parametrize(
    ("name", "capability", "bf16", "expected"),
    [
        ("NVIDIA A100-SXM4-80GB", (8, 0), True, torch.bfloat16),
        ("Tesla T4", (7, 5), False, torch.float16),
        ("Tesla P100-PCIE-16GB", (6, 0), False, torch.float32),
    ],
)
def test_auto_dtype_on_a_gpu_follows_spec_6(monkeypatch, name, capability, bf16, expected):
    simulate_gpu(monkeypatch, name, capability, bf16)
    assert resolve_device("auto") == torch.device("cuda")
    assert select_dtype(torch.device("cuda"), None) == expected


def test_bf16_on_a_gpu_without_bf16_is_a_precision_error(monkeypatch, base):
    simulate_gpu(monkeypatch, "Tesla V100-SXM2-16GB", (7, 0), bf16=False)
    assert resolve_device("cuda") == torch.device("cuda")
    with pytest.raises(PrecisionError, match="Tesla V100-SXM2-16GB"):
        select_dtype(torch.device("cuda"), torch.bfloat16)
    # from_pretrained checks before it allocates anything on the (simulated) GPU
    with pytest.raises(PrecisionError, match="does not support bfloat16"):
        QwenVLForCausalLM.from_pretrained(base, bf16=True, device_map="cuda")


def test_cuda_device_map_without_cuda_is_refused(monkeypatch, base):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device_map='cuda'.*no CUDA device"):
        QwenVLForCausalLM.from_pretrained(base, device_map="cuda")


def test_device_map_naming_cuda_without_cuda_is_refused(monkeypatch, base):
    """A map over several devices is placed (tests/test_placement.py), each device checked."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    device_map = {"transformer": "cpu", "lm_head": "cuda:0"}
    with pytest.raises(ValueError, match=r"device_map\['lm_head'\]='cuda:0' asks for CUDA"):
        QwenVLForCausalLM.from_pretrained(base, device_map=device_map)


# -- errors that name the culprit ---------------------------------------------------------------------


def test_missing_folder(tmp_path):
    folder = tmp_path / "no-such-model"
    with pytest.raises(ModelNotFoundError, match="no-such-model"):
        QwenVLForCausalLM.from_pretrained(folder)


def test_folder_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="has no config.json") as caught:
        QwenVLForCausalLM.from_pretrained(tmp_path)
    assert str(tmp_path) in str(caught.value)


def test_config_of_another_model_type(base, tmp_path):
    folder = copy_folder(base, tmp_path / "llama")
    edit_json(folder / "config.json", model_type="llama")
    with pytest.raises(CheckpointError, match="'llama'") as caught:
        QwenVLForCausalLM.from_pretrained(folder)
    assert str(folder / "config.json") in str(caught.value)


def test_folder_without_weights(base, tmp_path):
    folder = copy_without_weights(base, tmp_path / "no-weights")
    with pytest.raises(CheckpointError, match="no weights in") as caught:
        QwenVLForCausalLM.from_pretrained(folder)
    assert str(folder) in str(caught.value) and "pytorch_model.bin" in str(caught.value)


def test_index_listing_a_missing_shard(layouts, tmp_path):
    folder = copy_folder(layouts["sharded-bin"], tmp_path / "lost-shard")
    (folder / "pytorch_model-00002-of-00003.bin").unlink()
    with pytest.raises(CheckpointError, match="pytorch_model-00002-of-00003.bin") as caught:
        QwenVLForCausalLM.from_pretrained(folder)
    assert "pytorch_model.bin.index.json" in str(caught.value)


def point_index_at(folder: Path, shard) -> tuple[Path, str]:
    """Make the .bin index give one tensor the shard `shard`; returns the index and that tensor."""
    index_path = folder / "pytorch_model.bin.index.json"
    index = json.loads(index_path.read_text())
    tensor = sorted(index["weight_map"])[0]
    index["weight_map"][tensor] = shard
    index_path.write_text(json.dumps(index))
    return index_path, tensor


@pytest.mark.parametrize("where", ["parent", "absolute", "through-a-link"])
def test_index_naming_a_shard_outside_the_folder_is_refused(layouts, tmp_path, where):
    folder = copy_folder(layouts["sharded-bin"], tmp_path / "model")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    # a real weight file lies there: only the name's place keeps it from being read
    shutil.copy(folder / "pytorch_model-00001-of-00003.bin", outside / "stolen.bin")
    if where == "parent":
        shard = "../elsewhere/stolen.bin"
    elif where == "absolute":
        shard = str(outside / "stolen.bin")
    else:
        os.symlink(outside, folder / "linked")
        shard = "linked/stolen.bin"
    index_path, _ = point_index_at(folder, shard)
    with pytest.raises(CheckpointError) as caught:
        QwenVLForCausalLM.from_pretrained(folder)
    assert str(index_path) in str(caught.value) and repr(shard) in str(caught.value)


@pytest.mark.parametrize("shard", [42, None, ["pytorch_model-00001-of-00003.bin"], ""], ids=repr)
def test_index_with_a_shard_that_is_not_a_file_name(layouts, tmp_path, shard):
    folder = copy_folder(layouts["sharded-bin"], tmp_path / "model")
    index_path, tensor = point_index_at(folder, shard)
    with pytest.raises(CheckpointError, match="not a file name") as caught:
        QwenVLForCausalLM.from_pretrained(folder)
    message = str(caught.value)
    assert str(index_path) in message and repr(tensor) in message and repr(shard) in message


def test_index_without_a_weight_map(layouts, tmp_path):
    folder = copy_folder(layouts["sharded-safetensors"], tmp_path / "model")
    index_path = folder / "model.safetensors.index.json"
    index_path.write_text(json.dumps(["model-00001-of-00003.safetensors"]))
    with pytest.raises(CheckpointError, match="'weight_map'") as caught:
        QwenVLForCausalLM.from_pretrained(folder)
    assert str(index_path) in str(caught.value)


@pytest.mark.parametrize(
    ("layout", "filename"),
    [("sharded-bin", "pytorch_model-00003-of-00003.bin"), ("single-safetensors", "model.safetensors")],
)
def test_truncated_weight_file(layouts, tmp_path, layout, filename):
    folder = copy_folder(layouts[layout], tmp_path / "truncated")
    path = folder / filename
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as caught:
        QwenVLForCausalLM.from_pretrained(folder)
    assert str(path) in str(caught.value)


@pytest.mark.parametrize(
    ("changes", "culprit"),
    [
        ({"hidden_size": -8}, "hidden_size must be a positive integer, got -8"),
        ({"num_hidden_layers": 0}, "num_hidden_layers must be a positive integer, got 0"),
        ({"vocab_size": 2048.5}, "vocab_size must be a positive integer, got 2048.5"),
        ({"kv_channels": "32"}, "kv_channels must be a positive integer, got '32'"),
        ({"intermediate_size": True}, "intermediate_size must be a positive integer, got True"),
        ({"layer_norm_epsilon": 0}, "layer_norm_epsilon must be a positive number, got 0"),
        ({"rotary_emb_base": -10000}, "rotary_emb_base must be a positive number, got -10000"),
        ({"rotary_pct": 1.5}, "rotary_pct must lie in (0, 1], got 1.5"),
        ({"kv_channels": 2}, "kv_channels 2 * rotary_pct 1.0 gives 2 rotary channels"),
        ({"seq_length": 1}, "seq_length 1 with use_logn_attn"),
        ({"visual": {"width": -1}}, "visual.width must be a positive integer, got -1"),
        ({"visual": {"mlp_ratio": 0.0}}, "visual.mlp_ratio must be a positive number, got 0.0"),
        ({"visual": {"heads": 3}}, "visual.width 32 is not a multiple of visual.heads 3"),
        ({"visual": {"patch_size": 15}}, "visual.image_size 448 is not a multiple of visual.patch_size 15"),
        ({"visual": {"output_dim": 200}}, "visual.output_dim 200 is not a multiple of 128"),
        ({"visual": {"n_queries": 17}}, "visual.n_queries 17 is not a square number"),
    ],
    ids=repr,
)
def test_config_with_a_size_no_model_can_have(base, tmp_path, changes, culprit):
    folder = copy_without_weights(base, tmp_path / "bad-size")
    data = json.loads((folder / "config.json").read_text())
    data.update({k: v for k, v in changes.items() if k != "visual"})
    data["visual"].update(changes.get("visual", {}))
    (folder / "config.json").write_text(json.dumps(data))
    # refused before any tensor is made, not by torch from inside the model's construction
    with pytest.raises(CheckpointError) as caught:
        QwenVLForCausalLM.from_pretrained(folder)
    assert str(folder / "config.json") in str(caught.value) and culprit in str(caught.value)
    # a config built in code is refused with the same message when a model is made from it
    with pytest.raises(ValueError) as caught, torch.device("meta"):
        QwenVLForCausalLM(QwenVLConfig.from_dict(data))
    assert culprit in str(caught.value)


def rewrite_bin(folder: Path, edit) -> Path:
    """Apply `edit` to the state dict of a single-file .bin checkpoint, in place."""
    path = folder / "pytorch_model.bin"
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)
    return path


def test_tensor_with_a_wrong_shape(base, tmp_path):
    folder = copy_folder(base, tmp_path / "wrong-shape")
    key = "transformer.h.0.mlp.w1.weight"
    path = rewrite_bin(folder, lambda state: state.update({key: torch.zeros(3, 5)}))
    with pytest.raises(CheckpointError, match=r"has shape \(3, 5\)") as caught:
        QwenVLForCausalLM.from_pretrained(folder)
    assert repr(key) in str(caught.value) and str(path) in str(caught.value)


def test_missing_tensor(base, tmp_path):
    folder = copy_folder(base, tmp_path / "missing-key")
    key = "transformer.visual.attn_pool.pos_embed"
    rewrite_bin(folder, lambda state: state.pop(key))
    with pytest.raises(CheckpointError, match="lacks") as caught:
        QwenVLForCausalLM.from_pretrained(folder)
    assert key in str(caught.value)


def test_unexpected_tensor(base, tmp_path):
    folder = copy_folder(base, tmp_path / "extra-key")
    key = "transformer.h.0.attn.rotary_emb.inv_freq"
    path = rewrite_bin(folder, lambda state: state.update({key: torch.ones(16)}))
    with pytest.raises(CheckpointError, match="unexpected tensor") as caught:
        QwenVLForCausalLM.from_pretrained(folder)
    assert repr(key) in str(caught.value) and str(path) in str(caught.value)


# -- the Hugging Face cache ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory, base) -> Path:
    """A Hugging Face cache holding Qwen/Qwen-VL-Chat at COMMIT, with refs/main pointing at it."""
    cache = tmp_path_factory.mktemp("hf-cache")
    repo = cache / "models--Qwen--Qwen-VL-Chat"
    shutil.copytree(base, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)  # no newline: huggingface_hub reads it verbatim
    return cache


def test_hub_id_loads_from_the_cache(hub_cache, reference):
    model = QwenVLForCausalLM.from_pretrained(HUB_ID, cache_dir=hub_cache, local_files_only=True)
    assert_same_parameters(model, reference)
    tokenizer = QwenVLTokenizer.from_pretrained(HUB_ID, cache_dir=hub_cache, local_files_only=True)
    assert tokenizer.encode("Hello world") == [9707, 1879]


def test_hub_snapshot_of_linked_shards_loads(layouts, reference, tmp_path):
    """The cache huggingface_hub writes: snapshot files are links to ../../blobs/<hash>."""
    repo = tmp_path / "hf-cache" / "models--Qwen--Qwen-VL-Chat"
    snapshot, blobs = repo / "snapshots" / COMMIT, repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    source = layouts["sharded-safetensors"]
    for k, path in enumerate(sorted(source.iterdir())):
        shutil.copy(path, blobs / f"blob{k}")
        os.symlink(f"../../blobs/blob{k}", snapshot / path.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    model = QwenVLForCausalLM.from_pretrained(HUB_ID, cache_dir=tmp_path / "hf-cache", local_files_only=True)
    assert_same_parameters(model, reference)


@pytest.mark.parametrize("set_at", ["before-import", "after-import"])
def test_hub_id_loads_with_hf_hub_offline(hub_cache, reference, monkeypatch, network_attempts, set_at):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if set_at == "before-import":  # huggingface_hub reads the variable once, at import
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    model = QwenVLForCausalLM.from_pretrained(HUB_ID, cache_dir=hub_cache)
    assert_same_parameters(model, reference)
    assert len(QwenVLTokenizer.from_pretrained(HUB_ID, cache_dir=hub_cache)) == 151_860
    assert network_attempts == []


def test_hub_offline_error_names_the_id(hub_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="'Qwen/Qwen-VL-Nowhere'.*local Hugging Face cache"):
        QwenVLForCausalLM.from_pretrained("Qwen/Qwen-VL-Nowhere", cache_dir=hub_cache)


def test_hub_revision_by_commit_hash(hub_cache, reference):
    model = QwenVLForCausalLM.from_pretrained(
        HUB_ID, revision=COMMIT, cache_dir=hub_cache, local_files_only=True
    )
    assert_same_parameters(model, reference)


def test_hub_id_missing_from_the_cache(hub_cache):
    with pytest.raises(ModelNotFoundError, match="'Qwen/Qwen-VL-Nowhere'"):
        QwenVLForCausalLM.from_pretrained("Qwen/Qwen-VL-Nowhere", cache_dir=hub_cache, local_files_only=True)
    with pytest.raises(ModelNotFoundError, match="'Qwen/Qwen-VL-Nowhere'"):
        QwenVLTokenizer.from_pretrained("Qwen/Qwen-VL-Nowhere", cache_dir=hub_cache, local_files_only=True)


@pytest.mark.skipif(importlib.util.find_spec("modelscope") is not None, reason="modelscope is installed")
def test_modelscope_without_modelscope_says_to_install_it():
    with pytest.raises(ModelNotFoundError, match="pip install modelscope") as caught:
        QwenVLForCausalLM.from_pretrained("modelscope:qwen/Qwen-VL-Chat")
    assert "qwen/Qwen-VL-Chat" in str(caught.value)


# -- transformers' Auto classes, without remote code ----------------------------------------------------


@pytest.fixture(scope="module")
def official_folder(tmp_path_factory, base) -> Path:
    """A folder whose configs carry the official auto_map and tokenizer class, as downloaded."""
    folder = copy_folder(base, tmp_path_factory.mktemp("official") / "Qwen-VL-Chat")
    edit_json(folder / "config.json", auto_map=OFFICIAL_MODEL_AUTO_MAP)
    edit_json(
        folder / "tokenizer_config.json",
        tokenizer_class="QWenTokenizer",
        auto_map=OFFICIAL_TOKENIZER_AUTO_MAP,
    )
    return folder


def test_auto_config_returns_our_config(official_folder):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(official_folder)
    assert type(config) is QwenVLConfig
    assert config.vision.width == CONFIG["visual"]["width"]


def test_auto_model_returns_our_model_without_remote_code(official_folder, reference):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(official_folder)
    assert isinstance(model, QwenVLForCausalLM)
    assert_same_parameters(model, reference)


def test_auto_tokenizer_returns_our_tokenizer(official_folder):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(official_folder)
    assert isinstance(tokenizer, QwenVLTokenizer)
    assert tokenizer.encode("<|im_start|>") == [151644]


# -- save_pretrained ----------------------------------------------------------------------------------


def test_save_round_trip_keeps_parameters_and_logits(base_model, tmp_path):
    target = tmp_path / "saved"
    base_model.save_pretrained(target)
    assert sorted(os.listdir(target)) == ["config.json", "generation_config.json", "model.safetensors"]
    again = QwenVLForCausalLM.from_pretrained(target, fp32=True)
    assert_same_parameters(again, base_model.state_dict())
    assert torch.equal(logits(again), logits(base_model))


def test_saved_config_is_an_official_style_config(base_model, tmp_path):
    base_model.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["model_type"] == "qwen" and "auto_map" not in data
    assert data["visual"] == CONFIG["visual"]
    assert data["architectures"] == ["QWenLMHeadModel"]
    config = load_config(str(tmp_path))
    assert config.llm == QwenVLConfig.from_dict(data).llm == QwenVLConfig.from_dict(CONFIG).llm
    assert config.vision == QwenVLConfig.from_dict(CONFIG).vision


def test_sharded_save_writes_an_index_and_loads(base_model, reference, tmp_path):
    limit = 1_000_000
    base_model.save_pretrained(tmp_path, max_shard_size=limit)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(reference)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in reference.values())
    shards: dict[str, list[str]] = {}
    for name, shard in index["weight_map"].items():
        shards.setdefault(shard, []).append(name)
    assert sorted(shards) == [
        f"model-{k:05d}-of-{len(shards):05d}.safetensors" for k in range(1, len(shards) + 1)
    ]
    for names in shards.values():  # within the limit, unless one tensor alone is bigger
        size = sum(reference[n].numel() * reference[n].element_size() for n in names)
        assert size <= limit or len(names) == 1
    assert_same_parameters(QwenVLForCausalLM.from_pretrained(tmp_path, fp32=True), reference)


def test_save_model_returns_the_paths_it_wrote(base_model, tmp_path):
    from qwenvl.loading import save_model

    written = save_model(base_model, tmp_path, max_shard_size=2_000_000)
    assert sorted(written) == sorted(str(tmp_path / name) for name in os.listdir(tmp_path))


def test_save_replaces_weights_left_in_the_folder(base, base_model, tmp_path):
    # a stale .bin index would otherwise win over the new safetensors file
    folder = copy_folder(base, tmp_path / "resaved")
    save_weights({k: torch.zeros_like(v) for k, v in base_model.state_dict().items()}, str(folder), shards=2)
    base_model.save_pretrained(folder)
    assert not [name for name in os.listdir(folder) if name.startswith("pytorch_model")]
    assert_same_parameters(QwenVLForCausalLM.from_pretrained(folder, fp32=True), base_model.state_dict())


def test_bf16_save_keeps_bf16(base, tmp_path):
    model = QwenVLForCausalLM.from_pretrained(base, bf16=True)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    again = QwenVLForCausalLM.from_pretrained(tmp_path, bf16=True)
    assert_same_parameters(again, model.state_dict())


def test_tied_embeddings_round_trip(tmp_path):
    from safetensors import safe_open

    config = small_config(vocab_size=2048, tie_word_embeddings=True)
    source = build_checkpoint(config, str(tmp_path / "tied"), SEED)
    model = QwenVLForCausalLM.from_pretrained(source, fp32=True)
    assert model.lm_head.weight is model.transformer.wte.weight
    model.save_pretrained(tmp_path / "saved")
    with safe_open(tmp_path / "saved" / "model.safetensors", framework="pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" not in keys and "transformer.wte.weight" in keys
    again = QwenVLForCausalLM.from_pretrained(tmp_path / "saved", fp32=True)
    assert again.lm_head.weight is again.transformer.wte.weight
    assert torch.equal(again.lm_head.weight, model.transformer.wte.weight)
    assert torch.equal(logits(again), logits(model))


# -- what a loaded model looks like ---------------------------------------------------------------------


def test_bf16_load_fills_every_parameter_in_bf16(base, reference):
    model = QwenVLForCausalLM.from_pretrained(base, bf16=True)
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert not [name for name, t in tensors.items() if t.is_meta]
    assert_same_parameters(model, reference)


def test_loaded_model_is_in_eval_mode_with_a_frozen_pos_embed(base_model):
    assert not base_model.training
    frozen = [name for name, p in base_model.named_parameters() if not p.requires_grad]
    assert frozen == ["transformer.visual.attn_pool.pos_embed"]


def test_generation_config_is_read_from_its_file(base, base_model, tmp_path):
    assert base_model.generation_config.top_p == 0.3
    assert base_model.generation_config.chat_format == "chatml"
    folder = copy_folder(base, tmp_path / "raw")
    edit_json(folder / "generation_config.json", top_p=0.8, chat_format="raw")
    config = QwenVLForCausalLM.from_pretrained(folder).generation_config
    assert (config.top_p, config.chat_format) == (0.8, "raw")


def test_generation_defaults_apply_without_the_file(base, tmp_path):
    folder = copy_folder(base, tmp_path / "no-generation-config")
    (folder / "generation_config.json").unlink()
    config = QwenVLForCausalLM.from_pretrained(folder).generation_config
    assert {key: getattr(config, key) for key in CHAT_GENERATION_DEFAULTS} == CHAT_GENERATION_DEFAULTS
