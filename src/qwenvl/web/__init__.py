"""`qwenvl web`: a Gradio chat demo in the spirit of the original Qwen-VL web demo.

Upload pictures, ask about them and watch the reply stream in; a reply with boxes also shows
the latest picture with the boxes drawn. Every handler reads and writes its caller's own
`Session` (a gr.State), never a module global. Generation goes through an `Engine`: a handler
only waits on its request's token stream, in one of Gradio's worker threads, so the event loop
stays free and the sessions that are generating at the same time decode together in one batch.

Gradio is imported inside functions: `import qwenvl` never imports this module, and the CLI can
add this module's flags without paying for gradio.
"""

from .app import add_arguments, build_demo, launch, run_from_args
from .chat import ChatHandlers, Session, chat_messages

__all__ = [
    "ChatHandlers",
    "Session",
    "add_arguments",
    "build_demo",
    "chat_messages",
    "launch",
    "run_from_args",
]
