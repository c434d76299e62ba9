"""The Gradio page of the web demo, its launch, and the `qwenvl web` flags."""

from __future__ import annotations

import argparse
import threading
from typing import Any

from ..chat_format import DEFAULT_SYSTEM
from ..engine import Engine
from ..images import DEFAULT_MAX_BYTES
from .chat import ChatHandlers, Session

TITLE = "Qwen-VL"
INTRO = (
    "Upload one or more pictures, then ask about them. Each upload becomes part of your next "
    "question. Ask for grounding (for example *Outline the circle*) to see the boxes drawn."
)


def build_demo(
    model,
    tokenizer,
    *,
    generation_options: dict | None = None,
    system: str = DEFAULT_SYSTEM,
    engine: Engine | None = None,
):
    """The Gradio Blocks of the demo.

    Pass an `engine` to own its life cycle (run_from_args does); without one, a started engine
    is made whose daemon thread lives as long as the process.
    """
    import gradio as gr
    from gradio.utils import get_upload_folder

    engine = engine if engine is not None else Engine(model).start()
    handlers = ChatHandlers(
        model,
        tokenizer,
        engine,
        upload_dir=get_upload_folder(),
        generation_options=generation_options,
        system=system,
    )
    # Quick handlers only touch their own session: no limit. Replies run up to a batch at a time
    # (one concurrency group for asking and regenerating); the rest wait in Gradio's queue.
    quick: dict[str, Any] = {"concurrency_limit": None}
    generating: dict[str, Any] = {"concurrency_limit": engine.max_batch_size, "concurrency_id": "reply"}

    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        session = gr.State(Session())
        gr.Markdown(f"## {TITLE}\n{INTRO}")
        chatbot = gr.Chatbot(label=TITLE, height=520, buttons=["copy"], elem_id="chat")
        # One line that grows: Gradio sends a one-line textbox on Enter and lets Shift+Enter add a line.
        query = gr.Textbox(
            lines=1,
            max_lines=8,
            label="Question",
            placeholder="Ask about the pictures (Enter sends, Shift+Enter adds a line)",
            elem_id="query",
        )
        with gr.Row():
            upload = gr.UploadButton(
                "Upload pictures", file_types=["image"], file_count="multiple", elem_id="upload"
            )
            submit = gr.Button("Submit", variant="primary", elem_id="submit")
            regenerate = gr.Button("Regenerate", elem_id="regenerate")
            clear = gr.Button("Clear", elem_id="clear")

        upload.upload(handlers.add_images, [upload, session], [session, chatbot], **quick)
        gr.on(
            [submit.click, query.submit], handlers.ask, [query, session], [query, session, chatbot], **quick
        ).then(handlers.respond, [session], [chatbot, session], **generating)
        regenerate.click(handlers.regenerate, [session], [session, chatbot], **quick).then(
            handlers.respond, [session], [chatbot, session], **generating
        )
        clear.click(handlers.clear, [session], [session, chatbot], **quick)
        chatbot.clear(handlers.clear, [session], [session, chatbot], **quick)
    return demo


def launch(demo, *, host: str = "127.0.0.1", port: int = 7860, share: bool = False, block: bool = True):
    """Serve `demo`; with block=False, return once the server runs (demo.close() stops it)."""
    return demo.launch(
        server_name=host,
        server_port=port,
        share=share,
        prevent_thread_lock=not block,
        max_file_size=DEFAULT_MAX_BYTES,  # the image policy's limit, enforced before the upload lands
        quiet=not block,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The web flags; the caller adds frontend.add_model_arguments and add_sampling_arguments."""
    group = parser.add_argument_group("web")
    group.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    group.add_argument("--port", type=int, default=7860, help="port to listen on (default: 7860)")
    group.add_argument("--share", action="store_true", help="also serve through a public gradio.live link")


def run_from_args(args: argparse.Namespace) -> int:
    """Load the model and serve the demo until interrupted (Ctrl-C or SIGTERM)."""
    from ..frontend import interrupts_call, load_from_args, sampling_options

    loaded = load_from_args(args)
    engine = Engine(loaded.model, decode_mode=getattr(args, "decode_mode", None) or "auto")
    demo = build_demo(
        loaded.model,
        loaded.tokenizer,
        generation_options=sampling_options(args),
        system=getattr(args, "system", None) or DEFAULT_SYSTEM,
        engine=engine,
    )
    interrupted = threading.Event()
    try:
        with interrupts_call(interrupted.set):
            _, local_url, share_url = launch(
                demo, host=args.host, port=args.port, share=args.share, block=False
            )
            print(f"the demo runs at {local_url}" + (f" and {share_url}" if share_url else ""), flush=True)
            # the engine in this thread, which loaded the model (see Engine.run); gradio in its own
            engine.run_while(interrupted.wait)
    finally:
        demo.close()
    return 0
