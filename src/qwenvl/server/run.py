"""Command-line flags of `qwenvl serve`, and running the server from them."""

from __future__ import annotations

import argparse
import errno
import os
import socket

API_KEY_ENV = "QWENVL_API_KEY"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Server flags; the model and sampling flags come from `qwenvl.frontend`."""
    from ..images import DEFAULT_MAX_BYTES, DEFAULT_MAX_REDIRECTS, DEFAULT_TIMEOUT, SERVER_DECODED_PIXELS
    from .image_loader import DEFAULT_FETCH_THREADS
    from .middleware import DEFAULT_MAX_REQUEST_BYTES

    group = parser.add_argument_group(
        "server",
        # lines broken here: `qwenvl serve --help` prints group descriptions as written
        "Besides the OpenAI routes under /v1: GET /health, and GET /metrics in Prometheus' text\n"
        "format (requests by endpoint and outcome, errors by kind, prompt and generated tokens,\n"
        "requests waiting and running, time to first token, time per output token, end-to-end\n"
        "latency). Neither needs the API key: they show counts and timings, never a request's\n"
        "content; keep them from the public with the network or a proxy if need be.",
    )
    group.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    group.add_argument(
        "--port", type=_port, default=8000, help="port to listen on (default: 8000; 0: any free one)"
    )
    group.add_argument(
        "--served-model-name",
        nargs="+",
        action="extend",
        type=_model_name,
        default=None,
        metavar="NAME",
        help="the model's names in the API (several allowed): /v1/models lists them, a request may name "
        "any of them, and one naming another model is answered 404 (model_not_found); a request that "
        "names none gets the first (default: the --model folder's name, or the hub id as given)",
    )
    key = group.add_mutually_exclusive_group()
    key.add_argument(
        "--api-key",
        default=None,
        help=f"require 'Authorization: Bearer <key>' on /v1/... (default: ${API_KEY_ENV}, else no key); a "
        "key given here is visible to other users in the process list: prefer --api-key-file or the variable",
    )
    key.add_argument(
        "--api-key-file", default=None, metavar="PATH", help="read the API key from the first line of PATH"
    )
    group.add_argument("--max-batch-size", type=int, default=16, help="requests decoded together")
    group.add_argument("--max-queue", type=int, default=64, help="waiting requests before answering 503")
    group.add_argument("--request-timeout", type=float, default=300.0, help="seconds per request")
    group.add_argument(
        "--max-request-bytes",
        type=_positive_int,
        default=DEFAULT_MAX_REQUEST_BYTES,
        help=f"larger request bodies are answered 413 (default: {DEFAULT_MAX_REQUEST_BYTES})",
    )

    images = parser.add_argument_group(
        "images",
        "What requests' image_url parts may name. By default only data: URLs; local files and "
        "http(s) URLs only as allowed here.",
    )
    images.add_argument("--max-images", type=int, default=8, help="images per conversation")
    images.add_argument(
        "--image-root",
        action="append",
        default=[],
        metavar="DIR",
        help="let requests name local files (paths, file://) under DIR (repeatable; default: none)",
    )
    images.add_argument(
        "--allow-remote-images",
        action="store_true",
        help="let requests name http(s) image URLs of any public host",
    )
    images.add_argument(
        "--allowed-media-domains",
        type=_domain_patterns,
        default=None,
        metavar="HOSTS",
        help="let requests name http(s) image URLs of these hosts only: a comma-separated list of "
        "names and *.domain patterns (e.g. 'images.example.com,*.example.org')",
    )
    images.add_argument(
        "--allow-private-media",
        action="store_true",
        help="let image URLs reach loopback, private, link-local and other non-public addresses "
        "(refused by default, on the first request and on every redirect)",
    )
    images.add_argument(
        "--image-fetch-timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"time for one image's whole fetch (default: {DEFAULT_TIMEOUT:g})",
    )
    images.add_argument(
        "--max-image-bytes",
        type=_positive_int,
        default=DEFAULT_MAX_BYTES,
        help=f"largest encoded image, fetched or sent (default: {DEFAULT_MAX_BYTES})",
    )
    images.add_argument(
        "--max-image-redirects",
        type=int,
        default=DEFAULT_MAX_REDIRECTS,
        help=f"redirects followed per image URL (default: {DEFAULT_MAX_REDIRECTS})",
    )
    images.add_argument(
        "--image-fetch-threads",
        type=_positive_int,
        default=DEFAULT_FETCH_THREADS,
        help=f"images fetched at once, over all requests (default: {DEFAULT_FETCH_THREADS})",
    )
    images.add_argument(
        "--max-decoded-pixels",
        type=_positive_int,
        default=SERVER_DECODED_PIXELS,
        help="larger pictures are decoded at a reduced size; the model sees 448x448 "
        f"(default: {SERVER_DECODED_PIXELS})",
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0-65535, not {text}")
    return value


def _model_name(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("a model name must not be empty")
    return text


def _domain_patterns(text: str) -> tuple[str, ...]:
    from ..remote_images import parse_domain_patterns

    try:
        return parse_domain_patterns(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def api_key(args: argparse.Namespace) -> str | None:
    """The key requests must bear: --api-key-file, else --api-key, else $QWENVL_API_KEY."""
    if args.api_key_file is not None:
        try:
            with open(args.api_key_file, encoding="utf-8") as file:
                key = file.readline().strip()
        except OSError as error:
            raise ValueError(f"--api-key-file {args.api_key_file}: {error.strerror}") from None
        if not key:
            raise ValueError(f"--api-key-file {args.api_key_file}: the first line is empty")
        return key
    return args.api_key or os.environ.get(API_KEY_ENV) or None


def image_policy(args: argparse.Namespace):
    from ..images import ImagePolicy

    return ImagePolicy.strict(
        args.image_root,
        allow_remote=args.allow_remote_images,
        timeout=args.image_fetch_timeout,
        max_bytes=args.max_image_bytes,
        allow_private_addresses=args.allow_private_media,
        allowed_domains=args.allowed_media_domains,
        max_redirects=args.max_image_redirects,
        max_decoded_pixels=args.max_decoded_pixels,
    )


def served_name(name: str) -> str:
    """The model id clients see: a folder's name, or the hub id as given."""
    return os.path.basename(os.path.normpath(name)) if os.path.isdir(name) else name


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, which uvicorn listens on once it starts: a taken port fails
    here, in one line, before the model loads."""
    where = f"{host}:{port}"
    # the address family as uvicorn chooses it: a name ("localhost") is listened on in IPv4
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    # as uvicorn does: a restarted server need not wait out its old connections' TIME_WAIT (a port
    # another socket listens on stays refused)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:  # socket.gaierror too: a host name that does not resolve
        sock.close()
        reason = (error.strerror or str(error)).lower()
        if error.errno == errno.EADDRINUSE:
            reason += " (another server listens there: stop it, or choose another --port)"
        raise OSError(f"cannot listen on {where}: {reason}") from None
    return sock


def run_from_args(args: argparse.Namespace) -> int:
    """Load the model and serve it until interrupted (Ctrl-C or SIGTERM)."""
    import uvicorn

    from ..chat_format import DEFAULT_SYSTEM
    from ..engine import Engine
    from ..frontend import interrupts_call, load_from_args, sampling_options
    from .app import create_app

    key, policy = api_key(args), image_policy(args)  # before the slow load: a bad flag fails at once
    sock = listening_socket(args.host, args.port)  # and so does a taken port
    try:
        loaded = load_from_args(args)
        names = list(dict.fromkeys(args.served_model_name or [served_name(loaded.name)]))
        engine = Engine(
            loaded.model,
            max_batch_size=args.max_batch_size,
            max_queue=args.max_queue,
            decode_mode=getattr(args, "decode_mode", None) or "auto",
        )
        app = create_app(
            engine,
            loaded.tokenizer,
            model_id=names,
            image_policy=policy,
            api_key=key,
            max_images=args.max_images,
            request_timeout=args.request_timeout,
            sampling_defaults=sampling_options(args),
            system=getattr(args, "system", None) or DEFAULT_SYSTEM,
            max_request_bytes=args.max_request_bytes,
            fetch_threads=args.image_fetch_threads,
        )
        server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port))

        def shut_down() -> None:  # as uvicorn does in the main thread: gracefully, then at once
            if server.should_exit:
                server.force_exit = True
            server.should_exit = True

        host = f"[{args.host}]" if ":" in args.host else args.host
        print(f"serving {', '.join(names)} at http://{host}:{sock.getsockname()[1]}/v1", flush=True)
        # the engine in this thread, which loaded the model (see Engine.run); HTTP in another one
        with interrupts_call(shut_down):
            # uvicorn raises SystemExit when it cannot start (it logs why)
            engine.run_while(lambda: server.run(sockets=[sock]))
    finally:
        sock.close()
    return 0
