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


def cache_root() -> Path:
    return Path(os.environ.get("QWENVL_CACHE", Path.home() / ".cache" / "qwenvl"))


def demo_checkpoint() -> str:
    """The placeholder model's folder, built once (about 80 MB) and reused."""
    from .demo_model import DEMO_CONFIG
    from .random_checkpoint import build_checkpoint

    # the trained demo model's shapes, with random weights (same code path, nothing to download)
    folder = cache_root() / "demo-random-v2"
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
