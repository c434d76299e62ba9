"""The web demo's conversations: per-session state, what the chat shows, and the event handlers.

Nothing here imports gradio at import time; the handlers are plain methods over a `Session`, so
tests drive them without a server, and `app.py` wires them to the page.
"""

from __future__ import annotations

import hashlib
import html
import io
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

from PIL import Image

from ..chat_format import DEFAULT_SYSTEM, ReplyText, get_stop_words_ids, prompt_settings
from ..conversation import Message, Prompt, build_prompt
from ..engine import Engine, EngineBusyError
from ..generation import PromptTooLongError, SamplingParams
from ..grounding import draw_boxes, parse_boxes
from ..images import ImageError, ImagePolicy, load_image
from .reply_html import reply_html

logger = logging.getLogger(__name__)

# What a finished reply with no text to show says, when there is no picture either.
_EMPTY = "*(empty reply)*"
_BOXES_ONLY = "*(only box coordinates, and no picture to draw them on)*"


@dataclass(eq=False)  # compared by identity: a conversation may hold the same picture twice
class Upload:
    image: Image.Image  # decoded RGB: what the model sees
    path: str  # the uploaded file: what the chat shows


@dataclass(eq=False)
class Turn:
    uploads: list[Upload]
    text: str
    reply: str | None = None  # None until the first characters arrive
    status: str = "asked"  # then "answering", then "done"
    annotated: str | None = None  # file of the latest picture with the reply's boxes drawn

    @property
    def message(self) -> Message:
        return Message([*(u.image for u in self.uploads), *([self.text] if self.text else [])])


@dataclass
class Session:
    """One browser session's conversation."""

    turns: list[Turn] = field(default_factory=list)
    pending: list[Upload] = field(default_factory=list)  # uploaded, part of the next question

    @property
    def busy(self) -> bool:
        return bool(self.turns) and self.turns[-1].status != "done"


def chat_messages(session: Session) -> list[dict]:
    """The Chatbot's value: messages with role and content (text, or {"path": file})."""
    messages = []
    for turn in session.turns:
        messages += [{"role": "user", "content": {"path": u.path}} for u in turn.uploads]
        if turn.text:
            messages.append({"role": "user", "content": _as_text(turn.text)})
        shown = reply_html(turn.reply or "", final=turn.status == "done")
        if shown:
            messages.append({"role": "assistant", "content": shown})
        elif turn.status == "done" and not turn.annotated:
            messages.append({"role": "assistant", "content": _EMPTY if not turn.reply else _BOXES_ONLY})
        if turn.annotated:
            messages.append({"role": "assistant", "content": {"path": turn.annotated}})
    messages += [{"role": "user", "content": {"path": u.path}} for u in session.pending]
    return messages


def _as_text(text: str) -> str:
    # The chat renders Markdown and HTML: escape, so that <img>, <ref> and <box> show as typed.
    return html.escape(text, quote=False)


class ChatHandlers:
    """The event handlers of one demo; every method takes and returns the caller's Session."""

    def __init__(
        self,
        model,
        tokenizer,
        engine: Engine,
        *,
        upload_dir: str,
        generation_options: dict | None = None,
        system: str = DEFAULT_SYSTEM,
    ):
        self.tokenizer = tokenizer
        self.engine = engine
        self.system = system
        options = dict(generation_options or {})
        config = model.generation_config
        # as in model.chat: these shape the prompt, the rest are sampling parameters
        self.chat_format, self.max_window_size = prompt_settings(
            config, options.pop("chat_format", None), options.pop("max_window_size", None)
        )
        self.params = SamplingParams.from_config(config, **options).with_stop_words(
            get_stop_words_ids(self.chat_format, tokenizer)
        )
        # Gradio only hands over files from its upload folder; the policy keeps that true even if
        # it did not, and adds the library's limits (size, pixels, raster formats only).
        self.upload_dir = upload_dir
        self.image_policy = ImagePolicy.strict(local_roots=(upload_dir,))
        self.annotation_dir = os.path.join(upload_dir, "qwenvl-web")

    # -- events ------------------------------------------------------------------------------------

    def add_images(self, files: list[str] | None, session: Session) -> tuple[Session, list[dict]]:
        for path in files or []:
            try:
                session.pending.append(Upload(load_image(path, self.image_policy), path))
            except ImageError as error:
                _warn(f"{os.path.basename(path)}: {error.reason}")
        return session, chat_messages(session)

    def ask(self, text: str, session: Session) -> tuple[str, Session, list[dict]]:
        """Start a turn with the typed text and the pending pictures; `respond` then answers it."""
        text = (text or "").strip()
        if session.busy:
            _warn("Wait for the reply to finish.")
        elif not text and not session.pending:
            _warn("Type a question or upload a picture first.")
        else:
            session.turns.append(Turn(session.pending, text))
            session.pending = []
            text = ""
        return text, session, chat_messages(session)

    def regenerate(self, session: Session) -> tuple[Session, list[dict]]:
        if session.busy:
            _warn("Wait for the reply to finish.")
        elif not session.turns:
            _warn("There is no reply to regenerate.")
        else:
            last = session.turns[-1]
            last.reply, last.annotated, last.status = None, None, "asked"
        return session, chat_messages(session)

    def clear(self, session: Session) -> tuple[Session, list[dict]]:
        # In place: a reply still streaming sees its turn gone and stops.
        session.turns.clear()
        session.pending.clear()
        return session, chat_messages(session)

    def respond(self, session: Session) -> Iterator[tuple[list[dict], Session]]:
        """Stream the reply to the last turn, if it awaits one."""
        if not session.turns or session.turns[-1].status != "asked":
            yield chat_messages(session), session
            return
        turn = session.turns[-1]
        turn.status = "answering"
        try:
            history = [(t.message, t.reply or "") for t in session.turns[:-1]]
            prompt = build_prompt(
                self.tokenizer, turn.message, history, self.system, self.max_window_size, self.chat_format
            )
            for text in self.stream_reply(prompt):
                if not session.turns or session.turns[-1] is not turn:  # cleared meanwhile
                    return
                turn.reply = text
                yield chat_messages(session), session
            turn.reply = turn.reply or ""
            turn.annotated = self.annotate(session, turn)
        except Exception as error:
            # give the pictures back for the next try; the question has to be asked again
            if turn in session.turns:
                session.turns.remove(turn)
                session.pending[:0] = turn.uploads
            yield chat_messages(session), session
            if isinstance(error, (EngineBusyError, PromptTooLongError)):
                _fail(str(error))
            logger.exception("a reply failed")
            _fail("The reply failed; the server log has the details.")
        finally:  # also when Gradio drops this generator: a broken stream must not lock the session
            turn.status = "done"
        yield chat_messages(session), session

    # -- generation and pictures -------------------------------------------------------------------

    def stream_reply(self, prompt: Prompt) -> Iterator[str]:
        """The growing reply to `prompt` (whole characters only); the request ends with the loop."""
        handle = self.engine.submit(prompt.ids, self.params, prompt.images)
        reply = ReplyText(self.tokenizer, self.chat_format)
        try:
            for token in handle:
                if reply.add(token):
                    yield reply.text
                if reply.stopped:
                    break
            if reply.finish():
                yield reply.text
        finally:  # also when the browser went away and Gradio dropped this generator
            handle.cancel()

    def annotate(self, session: Session, turn: Turn) -> str | None:
        """A file of the conversation's latest picture with `turn`'s boxes drawn, if it has both."""
        boxes = parse_boxes(turn.reply or "")
        images = []
        for earlier in session.turns:  # empty when the conversation was just cleared
            images += [u.image for u in earlier.uploads]
            if earlier is turn:
                break
        if not boxes or not images:
            return None
        return self._save_png(draw_boxes(images[-1], boxes))

    def _save_png(self, image: Image.Image) -> str:
        # Gradio serves files from its upload folder; naming by content makes re-saving a no-op
        # and the name unguessable to other sessions.
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data = buffer.getvalue()
        os.makedirs(self.annotation_dir, exist_ok=True)
        path = os.path.join(self.annotation_dir, hashlib.sha256(data).hexdigest() + ".png")
        if not os.path.exists(path):
            with open(path, "wb") as file:
                file.write(data)
        return path


def _warn(message: str) -> None:
    import gradio as gr

    gr.Warning(html.escape(message))  # the modal renders HTML


def _fail(message: str) -> None:
    import gradio as gr

    raise gr.Error(html.escape(message))
