"""An OpenAI Chat Completions compatible server over the batching engine (`qwenvl serve`).

`add_arguments` and `run_from_args` import nothing heavy, so a CLI can offer the `serve` command
without fastapi installed; `create_app` (fastapi) is imported on first use.
"""

from __future__ import annotations

from .run import add_arguments, run_from_args

__all__ = ["add_arguments", "create_app", "run_from_args"]


def __getattr__(name: str):
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
