"""The placeholder demo: a tiny random-weight Qwen-VL built on first use, so everything runs offline.

Its answers are noise (the weights are random); it exercises the real code path end to end:
image loading, the vision tower, the LLM, chat formatting and grounding.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

DEMO_IMAGE = str(resources.files("qwenvl") / "assets" / "demo.png")
DEMO_SEED = 1000
# the golden tiny shapes: hidden 128, 2 layers, a 2-layer 64-wide ViT, the real vocabulary
DEMO_CONFIG = {
    "model_type": "qwen",
    "architectures": ["QWenLMHeadModel"],
    "hidden_size": 128,
    "num_attention_heads": 4,
    "kv_channels": 32,
    "num_hidden_layers": 2,
    "intermediate_size": 512,
    "vocab_size": 151936,
    "seq_length": 2048,
    "max_position_embeddings": 8192,
    "layer_norm_epsilon": 1e-6,
    "rotary_emb_base": 10000,
    "rotary_pct": 1.0,
    "use_dynamic_ntk": True,
    "use_logn_attn": True,
    "no_bias": True,
    "visual": {
        "heads": 4,
        "image_size": 448,
        "image_start_id": 151857,
        "layers": 2,
        "mlp_ratio": 4.9231,
        "output_dim": 128,
        "patch_size": 14,
        "width": 64,
    },
}


def cache_root() -> Path:
    return Path(os.environ.get("QWENVL_CACHE", Path.home() / ".cache" / "qwenvl"))


def demo_checkpoint() -> str:
    """The demo model's folder, built once (about 160 MB) and reused."""
    from .random_checkpoint import build_checkpoint

    folder = cache_root() / "tiny-random-v1"
    if (folder / "config.json").exists():
        return str(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    # build beside the target and rename, so an interrupted build never leaves a half folder
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=folder.parent))
    try:
        build_checkpoint(DEMO_CONFIG, str(staging), DEMO_SEED)
        staging.rename(folder)
    except OSError:
        if not (folder / "config.json").exists():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(folder)


def default_model() -> str:
    """The bundled trained demo model when the package has one, else the random placeholder."""
    from .demo_model import DEMO_MODEL, demo_available

    return DEMO_MODEL if demo_available() else demo_checkpoint()


def main() -> None:
    """`make run`: ask the default model about the bundled picture; boxes are drawn to a file."""
    from .cli import main as cli_main
    from .demo_model import demo_available

    trained = demo_available()
    question = "Box the red circle." if trained else "Describe the picture."
    model = "bundled demo model" if trained else "tiny random-weight placeholder (answers are noise)"
    print(json.dumps({"model": model, "image": DEMO_IMAGE, "question": question}))
    argv = [
        "ask",
        "--image",
        DEMO_IMAGE,
        "--greedy",
        "--max-new-tokens",
        "48",
        "--save-boxes",
        "demo-boxes.png",
    ]
    raise SystemExit(cli_main([*argv, question]))


if __name__ == "__main__":
    main()
