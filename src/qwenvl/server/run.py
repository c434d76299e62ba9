"""Command-line flags of `qwenvl serve`, and running the server from them."""

from __future__ import annotations

import argparse
import os

API_KEY_ENV = "QWENVL_API_KEY"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Server flags; the model and sampling flags come from `qwenvl.frontend`."""
    group = parser.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    group.add_argument("--port", type=int, default=8000)
    group.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV) or None,
        help=f"require 'Authorization: Bearer <key>' (default: ${API_KEY_ENV}, else no key)",
    )
    group.add_argument(
        "--allow-remote-images", action="store_true", help="let requests name http(s) image URLs"
    )
    group.add_argument(
        "--image-root",
        action="append",
        default=[],
        metavar="DIR",
        help="let requests name local files (paths, file://) under DIR (repeatable; default: none)",
    )
    group.add_argument("--max-batch-size", type=int, default=16, help="requests decoded together")
    group.add_argument("--max-queue", type=int, default=64, help="waiting requests before answering 503")
    group.add_argument("--request-timeout", type=float, default=300.0, help="seconds per request")
    group.add_argument("--max-images", type=int, default=8, help="images per conversation")


def served_name(name: str) -> str:
    """The model id clients see: a folder's name, or the hub id as given."""
    return os.path.basename(os.path.normpath(name)) if os.path.isdir(name) else name


def run_from_args(args: argparse.Namespace) -> int:
    """Load the model and serve it until interrupted (Ctrl-C or SIGTERM)."""
    import uvicorn

    from ..chat_format import DEFAULT_SYSTEM
    from ..engine import Engine
    from ..frontend import interrupts_call, load_from_args, sampling_options
    from ..images import ImagePolicy
    from .app import create_app

    loaded = load_from_args(args)
    model_id = served_name(loaded.name)
    engine = Engine(
        loaded.model,
        max_batch_size=args.max_batch_size,
        max_queue=args.max_queue,
        decode_mode=getattr(args, "decode_mode", None) or "auto",
    )
    app = create_app(
        engine,
        loaded.tokenizer,
        model_id=model_id,
        image_policy=ImagePolicy.strict(args.image_root, allow_remote=args.allow_remote_images),
        api_key=args.api_key or None,
        max_images=args.max_images,
        request_timeout=args.request_timeout,
        sampling_defaults=sampling_options(args),
        system=getattr(args, "system", None) or DEFAULT_SYSTEM,
    )
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port))

    def shut_down() -> None:  # as uvicorn does in the main thread: gracefully, then at once
        if server.should_exit:
            server.force_exit = True
        server.should_exit = True

    print(f"serving {model_id} at http://{args.host}:{args.port}/v1", flush=True)
    # the engine in this thread, which loaded the model (see Engine.run); HTTP in another one
    with interrupts_call(shut_down):
        engine.run_while(server.run)  # uvicorn raises SystemExit when it cannot start (it logs why)
    return 0
