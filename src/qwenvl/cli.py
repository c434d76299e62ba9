"""The `qwenvl` command: ask one question, chat in the terminal, or start the server or web demo.

This module imports nothing heavy itself: the model, images and grounding load inside the commands,
and the server and web modules (with their fastapi / gradio extras) only when their command runs.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, TextIO

from . import __version__, frontend
from .frontend import MissingExtraError
from .prefix_cache import PrefixCache

MAIN_EPILOG = """\
examples:
  qwenvl ask --image photo.jpg "What is in this picture?"
  qwenvl chat --model Qwen/Qwen-VL-Chat --image photo.jpg
  qwenvl serve --model Qwen/Qwen-VL-Chat
  qwenvl web --model Qwen/Qwen-VL-Chat

The model is --model, else $QWENVL_MODEL, else the bundled demo model: a small Qwen-VL trained
offline on synthetic pictures of coloured shapes, which it counts, names, describes and boxes (in
English or Chinese); other pictures and questions are beyond it. "python -m qwenvl.demo" asks it
about its own picture. Run "qwenvl COMMAND --help" for a command's options.
"""

ASK_EPILOG = """\
examples:
  qwenvl ask --image photo.jpg "What is in this picture?"
  qwenvl ask --image a.png --image b.png "What differs between the two pictures?"
  qwenvl ask --image street.jpg --json "Where is the bus? Give its box."

The reply goes to stdout. When it holds <box> coordinates and an image was given, the boxes are
drawn on the last image and saved to --save-boxes; the path is printed to stderr.

--json prints one object instead:
  response     the reply text
  boxes        [{"phrase", "box": [x1, y1, x2, y2] in 0..1000, "pixels": the box in the last image}]
  boxes_image  the annotated picture's path, or null
  usage        {"prompt_tokens", "completion_tokens"} (the reply re-encoded, stop token not counted)
  timings      {"load_s", "first_token_s", "total_s", "tokens_per_s"}; first_token_s and total_s
               count from the question (after loading), first_token_s until the first text streams
"""

CHAT_COMMANDS = """\
commands (":" or "/" in front):
  :image PATH    attach an image to the next question (repeat for several)
  :clear         forget the conversation
  :history       show the conversation so far
  :help          show these commands
  :quit, :exit   leave (so do Ctrl-D and Ctrl-C at the prompt; Ctrl-C during a reply stops it)"""

CHAT_EPILOG = f"""\
examples:
  qwenvl chat
  qwenvl chat --model Qwen/Qwen-VL-Chat --image photo.jpg

Type a question and press Enter; the reply streams as it is generated. Images given with --image
are attached to the first question.
{CHAT_COMMANDS}

When a reply holds <box> coordinates, they are drawn on the latest picture of the conversation
and saved as qwenvl-turn-N.png in --save-dir.
"""

PROMPT = "you: "
REPLY_PREFIX = "qwen-vl: "


@dataclass(frozen=True)
class Extra:
    """A subcommand that lives in an optional module with its own dependencies."""

    module: str
    extra: str  # the install extra it needs; "" when it needs nothing beyond the core
    help: str
    example: str
    shared_options: bool = True  # the common model and sampling flags (else the module has its own)


EXTRAS = {
    "serve": Extra(
        "qwenvl.server", "server", "serve the model over HTTP (a chat completions API)",
        "qwenvl serve --model Qwen/Qwen-VL-Chat --port 8000",
    ),
    "web": Extra(
        "qwenvl.web", "web", "start the web demo (Gradio) in the browser",
        "qwenvl web --model Qwen/Qwen-VL-Chat",
    ),
    "finetune": Extra(
        "qwenvl.finetune.cli", "finetune", "fine-tune on conversations (full or LoRA)",
        "qwenvl finetune --model Qwen/Qwen-VL-Chat --data train.json --output out --lora",
        shared_options=False,
    ),
    "synthesize": Extra(
        "qwenvl.synthetic", "", "write a synthetic shapes data set (train and eval)",
        "qwenvl synthesize --out data --scenes 2000 --eval-scenes 100", shared_options=False,
    ),
    "quantize": Extra(
        "qwenvl.int4.quantize", "", "write a 4-bit (GPTQ, Int4) copy of a checkpoint",
        "qwenvl quantize --bits 4 --group-size 128 Qwen/Qwen-VL-Chat qwen-vl-chat-int4",
        shared_options=False,
    ),
    "eval": Extra(
        "qwenvl.evaluate", "", "score a model on held-out synthetic scenes",
        "qwenvl eval --model out --scenes 50", shared_options=False,
    ),
}  # fmt: skip


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser; the serve / web module is imported only when `command` names it."""
    parser = argparse.ArgumentParser(
        prog="qwenvl",
        description="Run Qwen-VL / Qwen-VL-Chat: ask about images, chat, serve an API or a web demo.",
        epilog=MAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"qwenvl {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    ask = _add_command(commands, "ask", "answer one question about zero or more images", ASK_EPILOG)
    ask.add_argument("question", help="the question (quote it)")
    _add_image_option(ask, "image path or URL (repeatable)")
    ask.add_argument("--json", action="store_true", help="print reply, boxes, usage and timings as JSON")
    ask.add_argument(
        "--save-boxes",
        default="qwenvl-boxes.png",
        metavar="PATH",
        help='where to save the annotated picture when the reply has boxes (default: %(default)s; "" skips)',
    )
    ask.set_defaults(run=run_ask)
    chat = _add_command(commands, "chat", "chat in the terminal, replies streaming", CHAT_EPILOG)
    _add_image_option(chat, "image path or URL for the first question (repeatable)")
    chat.add_argument(
        "--save-dir", default=".", metavar="DIR", help="folder for annotated pictures (default: .)"
    )
    chat.set_defaults(run=run_chat)
    for name in EXTRAS:
        _add_extra_command(commands, name, load=name == command)
    return parser


def _add_command(commands, name: str, summary: str, epilog: str) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        name, help=summary, description=summary[0].upper() + summary[1:] + ".", epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    frontend.add_model_arguments(parser)
    frontend.add_sampling_arguments(parser)
    return parser


def _add_image_option(parser: argparse.ArgumentParser, summary: str) -> None:
    parser.add_argument("--image", action="append", default=[], metavar="PATH", help=summary)


def _add_extra_command(commands, name: str, load: bool) -> None:
    extra = EXTRAS[name]
    epilog = f"example:\n  {extra.example}\n\n"
    if extra.extra:
        epilog += f"Needs the {extra.extra} extra: pip install 'qwenvl[{extra.extra}]'\n"
    if extra.shared_options:
        parser = _add_command(commands, name, extra.help, epilog)
    else:
        parser = commands.add_parser(
            name, help=extra.help, description=extra.help[0].upper() + extra.help[1:] + ".", epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )  # fmt: skip
    parser.set_defaults(run=_run_extra, missing=None)
    if not load:
        return  # its own options are only needed when this command is the one being run
    try:
        _import_extra(name).add_arguments(parser)
    except MissingExtraError as error:
        parser.set_defaults(missing=error)
        parser.description += f"\nNot available here: {error}"


def _import_extra(name: str) -> ModuleType:
    with _extra_dependencies(name):
        return importlib.import_module(EXTRAS[name].module)


def _run_extra(args: argparse.Namespace) -> int:
    with _extra_dependencies(args.command):  # the module may import fastapi / gradio only when run
        result = _import_extra(args.command).run_from_args(args)
    return 0 if result is None else int(result)


@contextlib.contextmanager
def _extra_dependencies(name: str) -> Iterator[None]:
    """Turn a missing extra module or dependency into MissingExtraError; qwenvl's own breakage stays."""
    try:
        yield
    except ModuleNotFoundError as error:
        extra, missing = EXTRAS[name], error.name or ""
        if not extra.extra or (missing != extra.module and missing.split(".")[0] == "qwenvl"):
            raise
        raise frontend.missing_extra(name, extra.extra, missing or extra.module) from error


# -- shared by ask and chat -------------------------------------------------------------------------


@dataclass
class Answer:
    text: str
    first_token_s: float | None  # until chat_stream yields its first text
    total_s: float


def _check_images(references: list[str]) -> None:
    """Fail on a missing or unreadable local image before the slow model load (URLs load later)."""
    from .images import load_image

    for reference in references:
        if "://" not in reference and not reference.startswith("data:"):
            load_image(reference)


def _answer(
    loaded: frontend.LoadedModel,
    args,
    query: str,
    history: list,
    echo: TextIO | None,
    prefix_cache: PrefixCache | None = None,
) -> Answer:
    """Generate a reply with chat_stream, writing each new piece of text to `echo` as it arrives
    (the stream only ever extends the text it yielded before)."""
    options: dict[str, Any] = frontend.sampling_options(args)
    if args.system is not None:
        options["system"] = args.system
    if prefix_cache is not None:
        options["prefix_cache"] = prefix_cache
    started = time.perf_counter()
    first, text = None, ""
    for grown in loaded.model.chat_stream(loaded.tokenizer, query, history=history, **options):
        if first is None:
            first = time.perf_counter() - started
        if echo is not None:
            echo.write(grown[len(text) :])
            echo.flush()
        text = grown
    return Answer(text, first, time.perf_counter() - started)


def _usage(loaded: frontend.LoadedModel, query: str, reply: str, system: str | None) -> dict[str, int]:
    from .chat_format import DEFAULT_SYSTEM, make_context, prompt_settings

    chat_format, window = prompt_settings(loaded.model.generation_config)
    _, prompt = make_context(loaded.tokenizer, query, None, system or DEFAULT_SYSTEM, window, chat_format)
    return {"prompt_tokens": len(prompt), "completion_tokens": len(loaded.tokenizer.encode_chat(reply))}


def _print_error(error: BaseException) -> None:
    print(f"qwenvl: error: {str(error) or type(error).__name__}", file=sys.stderr)


# -- ask --------------------------------------------------------------------------------------------


def run_ask(args: argparse.Namespace) -> int:
    from .grounding import draw_boxes, parse_boxes
    from .images import load_image

    _check_images(args.image)
    started = time.perf_counter()
    loaded = frontend.load_from_args(args)  # show_progress=None: a bar only when stderr is a terminal
    load_s = time.perf_counter() - started
    tokenizer = loaded.tokenizer
    query = tokenizer.from_list_format([*({"image": path} for path in args.image), {"text": args.question}])
    echo = sys.stdout if sys.stdout.isatty() and not args.json else None
    answer = _answer(loaded, args, query, [], echo)

    boxes = parse_boxes(answer.text)
    picture = load_image(args.image[-1]) if boxes and args.image else None
    saved = None
    if picture is not None and args.save_boxes:
        Path(args.save_boxes).parent.mkdir(parents=True, exist_ok=True)
        draw_boxes(picture, boxes).save(args.save_boxes)
        saved = args.save_boxes

    if not args.json:
        print("" if echo is not None else answer.text)  # a streamed reply only needs its line ended
        if saved:
            print(f"boxes drawn on {saved}", file=sys.stderr)
        return 0
    usage = _usage(loaded, query, answer.text, args.system)
    size = picture.size if picture is not None else None
    boxes_json = [
        {"phrase": b.phrase, "box": list(b.coords), "pixels": list(b.to_pixels(*size)) if size else None}
        for b in boxes
    ]
    timings = {
        "load_s": round(load_s, 3),
        "first_token_s": None if answer.first_token_s is None else round(answer.first_token_s, 3),
        "total_s": round(answer.total_s, 3),
        "tokens_per_s": round(usage["completion_tokens"] / answer.total_s, 2) if answer.total_s else None,
    }
    report = {"response": answer.text, "boxes": boxes_json, "boxes_image": saved, "usage": usage}
    print(json.dumps({**report, "timings": timings}, ensure_ascii=False))
    return 0


# -- chat -------------------------------------------------------------------------------------------


@dataclass
class ChatSession:
    loaded: frontend.LoadedModel
    args: argparse.Namespace
    images: list[str] = field(default_factory=list)  # attached to the next question
    history: list[tuple[str, str]] = field(default_factory=list)
    turns: int = 0  # never reset, so a cleared conversation does not overwrite earlier pictures
    # the conversation's keys and values: a turn runs only its new tokens through the model
    prefix_cache: PrefixCache = field(default_factory=PrefixCache)


def run_chat(args: argparse.Namespace) -> int:
    _check_images(args.image)
    print(f"Loading {frontend.model_name(args)} ...", file=sys.stderr, flush=True)
    session = ChatSession(frontend.load_from_args(args), args, images=list(args.image))
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    print(f"Chatting with {session.loaded.name}. Type :help for commands, :quit to leave.")
    for image in session.images:
        print(f"(attached to your first question: {image})")
    while True:
        try:
            line = input(PROMPT).strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not line:
            continue
        if line[0] in ":/":
            if not _chat_command(session, line):
                return 0
        else:
            _chat_turn(session, line)


def _chat_command(session: ChatSession, line: str) -> bool:
    """Run one `:command`; False means leave."""
    name, _, rest = line[1:].partition(" ")
    name, rest = name.lower(), rest.strip().strip("'\"")
    if name in ("quit", "exit", "q"):
        return False
    if name == "image":
        _attach(session, rest)
    elif name == "clear":
        session.history.clear()
        session.images.clear()
        session.prefix_cache.clear()
        print("(conversation cleared)")
    elif name == "history":
        _show_history(session)
    elif name == "help":
        print(CHAT_COMMANDS)
    else:
        print(f"unknown command {line.split()[0]!r}; type :help")
    return True


def _attach(session: ChatSession, path: str) -> None:
    if not path:
        print(f"(attached to your next question: {', '.join(session.images) or 'nothing'})")
        return
    try:
        _check_images([path])
    except (OSError, ValueError) as error:
        _print_error(error)
        return
    session.images.append(path)
    print(f"(attached to your next question: {path})")


def _show_history(session: ChatSession) -> None:
    if not session.history:
        print("(no conversation yet)")
    for number, (query, reply) in enumerate(session.history, start=1):
        print(f"[{number}] you: " + query.replace("\n", "\n    "))
        print(f"    {REPLY_PREFIX}" + reply.replace("\n", "\n    "))


def _chat_turn(session: ChatSession, question: str) -> None:
    tokenizer = session.loaded.tokenizer
    query = tokenizer.from_list_format([*({"image": path} for path in session.images), {"text": question}])
    session.images = []
    print(REPLY_PREFIX, end="", flush=True)
    try:
        answer = _answer(
            session.loaded, session.args, query, session.history, sys.stdout, session.prefix_cache
        )
    except KeyboardInterrupt:
        print("\n(reply interrupted)")
        return
    except (OSError, ValueError) as error:
        print()
        _print_error(error)
        return
    print()
    session.history.append((query, answer.text))
    session.turns += 1
    _save_turn_boxes(session, answer.text)


def _save_turn_boxes(session: ChatSession, reply: str) -> None:
    try:
        picture = session.loaded.tokenizer.draw_bbox_on_latest_picture(reply, session.history)
    except (OSError, ValueError) as error:
        _print_error(error)
        return
    if picture is None:
        return
    path = Path(session.args.save_dir) / f"qwenvl-turn-{session.turns}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)
    print(f"(boxes drawn on {path})")


# -- entry point ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    parser = build_parser(command)
    args, unknown = parser.parse_known_args(argv)
    try:
        if getattr(args, "missing", None) is not None:
            raise args.missing  # before complaining about options only the missing module knows
        if unknown:
            parser.parse_args(argv)  # exits with argparse's usual "unrecognized arguments" error
        return args.run(args)
    except KeyboardInterrupt:
        return 130
    except (MissingExtraError, OSError, ValueError) as error:
        _print_error(error)
        return 2


if __name__ == "__main__":
    sys.exit(main())
