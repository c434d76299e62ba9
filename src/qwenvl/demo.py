"""`make run`: the bundled demo model answers questions about the bundled picture, offline.

The demo model (see demo_model.py) is a small Qwen-VL trained on the synthetic shapes world; the
picture is a held-out scene of that world. The answer with a box is drawn on the picture.
"""

from __future__ import annotations

import json
from importlib import resources

DEMO_IMAGE = str(resources.files("qwenvl") / "assets" / "demo.png")
DEMO_QUESTION = "Box the red circle."
BOXES_FILE = "demo-boxes.png"


def default_model() -> str:
    """The model front ends use when none is named: the bundled demo model."""
    from .demo_model import DEMO_MODEL

    return DEMO_MODEL


def main() -> None:
    """Ask the demo model about the bundled picture; the box is drawn to demo-boxes.png."""
    from .cli import main as cli_main

    print(json.dumps({"model": "bundled demo model", "image": DEMO_IMAGE, "question": DEMO_QUESTION}))
    argv = ["ask", "--image", DEMO_IMAGE, "--max-new-tokens", "48", "--save-boxes", BOXES_FILE]
    raise SystemExit(cli_main([*argv, DEMO_QUESTION]))


if __name__ == "__main__":
    main()
