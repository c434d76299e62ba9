"""The bundled demo model: how it is built, and where it lives.

A small Qwen-VL (same code path as the real one, the real tokenizer) trained by `qwenvl finetune`
on the synthetic shapes world. `make demo-model` reproduces it: `python -m qwenvl.demo_model init`
writes the fresh model (DEMO_CONFIG), `qwenvl synthesize` the data, `qwenvl finetune` trains it,
`python -m qwenvl.demo_model pretrain-vision` teaches its ViT what lies under each patch (see
finetune.vision_pretraining), `python -m qwenvl.demo_model pack` stores it in the package and
`qwenvl eval` scores it; the Makefile holds the exact options and order.

The package stores it compactly (see compact_vocabulary): only the embedding and LM-head rows of
the ids its training data uses, plus one shared row for all others, in fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

DEMO_MODEL = str(resources.files("qwenvl") / "assets" / "demo-model")

DEMO_CONFIG = {
    "model_type": "qwen",
    "architectures": ["QWenLMHeadModel"],
    "hidden_size": 128,
    "num_attention_heads": 4,
    "kv_channels": 32,
    "num_hidden_layers": 4,
    "intermediate_size": 1024,
    "vocab_size": 151936,
    "seq_length": 2048,
    "max_position_embeddings": 8192,
    "layer_norm_epsilon": 1e-6,
    "rotary_emb_base": 10000,
    "rotary_pct": 0.5,  # half the channels match content at any distance (grounding learns sooner)
    "use_dynamic_ntk": True,
    "use_logn_attn": True,
    "no_bias": True,
    "tie_word_embeddings": True,
    "visual": {
        "image_size": 224,
        "patch_size": 14,
        "width": 128,
        "layers": 3,
        "heads": 4,
        "mlp_ratio": 4.0,
        "output_dim": 128,
        "image_start_id": 151857,
    },
}
# Greedy answers: the demo should say the same thing every time.
DEMO_GENERATION = {
    "chat_format": "chatml",
    "do_sample": False,
    "eos_token_id": 151643,
    "pad_token_id": 151643,
    "max_new_tokens": 64,
    "max_window_size": 6144,
}


def init_model(folder: str | os.PathLike, seed: int = 0) -> str:
    """A fresh (untrained) demo-sized model folder with the tokenizer, ready for `qwenvl finetune`."""
    import torch

    from . import QwenVLConfig, QwenVLForCausalLM, QwenVLTokenizer

    torch.manual_seed(seed)
    model = QwenVLForCausalLM(QwenVLConfig.from_dict(DEMO_CONFIG))
    model.save_pretrained(folder)
    QwenVLTokenizer().save_pretrained(folder)
    with open(Path(folder) / "generation_config.json", "w") as f:
        json.dump(DEMO_GENERATION, f, indent=2)
    return os.fspath(folder)


def used_token_ids(tokenizer, train_jsons: Sequence[str | os.PathLike]) -> set[int]:
    """Every id the training conversations use, plus the special tokens chat and grounding need."""
    from .chat_format import DEFAULT_SYSTEM, make_context
    from .finetune.data import load_items

    ids = set(tokenizer.special_tokens.values())
    ids.update(make_context(tokenizer, "", system=DEFAULT_SYSTEM)[1])
    for train_json in train_jsons:
        for item in load_items(train_json):
            for turn in item["conversations"]:
                ids.update(tokenizer.encode_chat(turn["value"]))
    return ids


def pack(
    trained: str | os.PathLike, train_jsons: Sequence[str | os.PathLike], out: str | os.PathLike = DEMO_MODEL
) -> str:
    """Write the trained model into `out` with a compact vocabulary (config, weights, generation).

    The vocabulary keeps the ids of every training set's conversations (`train_jsons`).
    """
    from safetensors.torch import save_file

    from . import QwenVLForCausalLM, QwenVLTokenizer
    from .compact_vocabulary import compact

    tokenizer = QwenVLTokenizer()
    model = QwenVLForCausalLM.from_pretrained(trained, fp32=True)
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    save_file(compact(state, used_token_ids(tokenizer, train_jsons)), str(out / "model.safetensors"))
    config = {k: v for k, v in json.loads((Path(trained) / "config.json").read_text()).items()}
    config.pop("auto_map", None)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps(DEMO_GENERATION, indent=2))
    (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "QWenTokenizer"}, indent=2))
    return str(out)


def pretrain_vision(
    model_folder: str | os.PathLike,
    out: str | os.PathLike,
    *,
    steps: int | None = None,
    batch_size: int = 32,
    lr: float | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Copy `model_folder` to `out` with its ViT pretrained on the world's dense patch labels.

    Returns the held-out patch metrics (see finetune.vision_pretraining); logs progress.
    """
    import torch

    from . import QwenVLForCausalLM, QwenVLTokenizer
    from .finetune import vision_pretraining

    steps = steps or vision_pretraining.STEPS
    model = QwenVLForCausalLM.from_pretrained(model_folder, fp32=True)

    def report(step: int, metrics: dict[str, float]) -> None:
        if step % 50 == 0 or step == steps:
            shown = "  ".join(f"{name} {value:.3f}" for name, value in metrics.items())
            print(f"step {step}/{steps}  {shown}", flush=True)

    with torch.enable_grad():
        held_out = vision_pretraining.pretrain_vision(
            model.transformer.visual,
            steps=steps,
            batch_size=batch_size,
            lr=lr or vision_pretraining.LR,
            seed=seed,
            on_step=report,
        )
    model.save_pretrained(out)
    QwenVLTokenizer().save_pretrained(out)
    if (Path(model_folder) / "generation_config.json").exists():
        shutil.copy(Path(model_folder) / "generation_config.json", Path(out) / "generation_config.json")
    (Path(out) / "vision_pretraining.json").write_text(json.dumps(held_out, indent=2))
    return held_out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qwenvl.demo_model", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    init = commands.add_parser("init", help="write a fresh demo-sized model folder")
    init.add_argument("folder")
    init.add_argument("--seed", type=int, default=0)
    packer = commands.add_parser("pack", help="store a trained model in the package, compactly")
    packer.add_argument("trained")
    packer.add_argument("train_json", nargs="+", help="every training set the model saw")
    packer.add_argument("--out", default=DEMO_MODEL)
    vision = commands.add_parser(
        "pretrain-vision", help="copy a model folder with its ViT trained on the world's patch labels"
    )
    vision.add_argument("model")
    vision.add_argument("out")
    vision.add_argument("--steps", type=int, help="default: vision_pretraining.STEPS")
    vision.add_argument("--batch-size", type=int, default=32)
    vision.add_argument("--lr", type=float, help="default: vision_pretraining.LR")
    vision.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "init":
        print(init_model(args.folder, args.seed))
    elif args.command == "pretrain-vision":
        held_out = pretrain_vision(
            args.model, args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed
        )
        print(json.dumps(held_out, indent=2))
    else:
        print(pack(args.trained, args.train_json, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
