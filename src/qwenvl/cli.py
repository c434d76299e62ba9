"""The `qwenvl` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwenvl", description="Run Qwen-VL / Qwen-VL-Chat models.")
    commands = parser.add_subparsers(dest="command", required=True)
    ask = commands.add_parser("ask", help="answer one question about zero or more images")
    ask.add_argument("question")
    ask.add_argument(
        "--model", default=os.environ.get("QWENVL_MODEL"), help="folder or hub id (default: demo)"
    )
    ask.add_argument("--image", action="append", default=[], help="image path or URL (repeatable)")
    ask.add_argument("--max-new-tokens", type=int, default=None)
    ask.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    ask.add_argument("--seed", type=int, default=None)
    ask.add_argument("--json", action="store_true", help="print reply, boxes and timings as JSON")
    return parser


def run_ask(args: argparse.Namespace) -> int:
    from . import QwenVLForCausalLM, QwenVLTokenizer
    from .demo import demo_checkpoint
    from .grounding import parse_boxes
    from .images import load_image

    model_name = args.model or demo_checkpoint()
    started = time.perf_counter()
    tokenizer = QwenVLTokenizer.from_pretrained(model_name)
    model = QwenVLForCausalLM.from_pretrained(model_name)
    loaded = time.perf_counter()
    query = tokenizer.from_list_format([*({"image": i} for i in args.image), {"text": args.question}])
    options = {"max_new_tokens": args.max_new_tokens, "seed": args.seed}
    if args.greedy:
        options["do_sample"] = False
    response, _ = model.chat(tokenizer, query, history=None, **options)
    answered = time.perf_counter()
    if not args.json:
        print(response)
        return 0
    boxes = []
    if args.image:
        width, height = load_image(args.image[-1]).size
        boxes = [{"phrase": b.phrase, "pixels": b.to_pixels(width, height)} for b in parse_boxes(response)]
    timings = {"load_s": round(loaded - started, 3), "answer_s": round(answered - loaded, 3)}
    print(json.dumps({"response": response, "boxes": boxes, "timings": timings}, ensure_ascii=False))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .images import ImageError

    try:
        return {"ask": run_ask}[args.command](args)
    except (ImageError, OSError, ValueError) as e:
        print(f"qwenvl: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
