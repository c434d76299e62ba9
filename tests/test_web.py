"""The web demo: its handlers hold the conversation model.chat would, and a real browser sees it work."""

from __future__ import annotations

import dataclasses
import io
import itertools
import os
import shutil
import signal
import string
import subprocess
import sys
from html.parser import HTMLParser

import pytest
from PIL import Image

from qwenvl.engine import Engine, EngineBusyError
from qwenvl.grounding import PALETTE, assign_colors, parse_boxes
from qwenvl.web import ChatHandlers, Session, add_arguments, build_demo, chat_messages
from qwenvl.web.reply_html import UNBOXED_COLOR, ref_label, reply_html

from .conftest import DATA
from .web_helpers import browser_page, chromium_or_skip, served

GREEDY = {"do_sample": False, "max_new_tokens": 8}
SHAPES = DATA / "images" / "shapes.png"  # 640x480; the red circle spans x 60..260, y 80..280
BOX_REPLY = "<ref>圆</ref><box>(94,167),(406,583)</box>"
CIRCLE_LEFT_EDGE = (60, 180)  # a pixel of the box's outline, in picture pixels


@pytest.fixture(scope="module")
def engine(tiny_model):
    with Engine(tiny_model) as engine:
        yield engine


@pytest.fixture
def upload_dir(tmp_path):
    folder = tmp_path / "uploads"
    folder.mkdir()
    return folder


@pytest.fixture
def uploaded(upload_dir):
    return str(shutil.copy(SHAPES, upload_dir / "shapes.png"))


@pytest.fixture
def handlers(tiny_model, tokenizer, engine, upload_dir):
    return ChatHandlers(tiny_model, tokenizer, engine, upload_dir=str(upload_dir), generation_options=GREEDY)


def fixed_reply(*texts, prompts=None):
    """A stand-in for ChatHandlers.stream_reply that yields `texts` and records the prompts."""

    def stream_reply(self, prompt):
        if prompts is not None:
            prompts.append(prompt)
        yield from texts

    return stream_reply


def replies(handlers, session):
    """Run the reply to the last question to its end; the replies shown while it streamed."""
    return [s.turns[-1].reply for _, s in handlers.respond(session)]


def answer(handlers, session, text):
    handlers.ask(text, session)
    return replies(handlers, session)


# -- the conversation ------------------------------------------------------------------------------


def test_conversation_matches_model_chat(handlers, tiny_model, tokenizer, uploaded):
    session, chat = handlers.add_images([uploaded], Session())
    assert chat == [{"role": "user", "content": {"path": uploaded}}] and len(session.pending) == 1

    text, session, _ = handlers.ask("What is in the picture?", session)
    assert text == "" and session.busy and session.pending == []
    streamed = replies(handlers, session)
    first = f"Picture 1: <img>{uploaded}</img>\nWhat is in the picture?"
    expected, history = tiny_model.chat(tokenizer, first, history=None, **GREEDY)
    assert streamed[-1] == expected and not session.busy
    # the reply grew: every shown text extends the one before
    shown = [r for r in streamed if r]
    assert all(b.startswith(a) for a, b in zip(shown, shown[1:], strict=False))

    streamed = answer(handlers, session, "And which colours?")
    second, _ = tiny_model.chat(tokenizer, "And which colours?", history=history, **GREEDY)
    assert streamed[-1] == second

    chat = chat_messages(session)
    roles = [m["role"] for m in chat]
    assert roles == ["user", "user", "assistant", "user", "assistant"]
    assert chat[0]["content"] == {"path": uploaded}
    assert chat[1]["content"] == "What is in the picture?"


def test_sessions_streaming_together_keep_their_own_conversations(handlers, tiny_model, tokenizer):
    questions = ["What is 2+2?", "Name a colour."]
    sessions = [Session(), Session()]
    for session, question in zip(sessions, questions, strict=True):
        handlers.ask(question, session)
    streams = [handlers.respond(s) for s in sessions]
    for step in itertools.zip_longest(*streams):  # both requests are in the engine at once
        assert all(isinstance(item, tuple) for item in step if item is not None)
    for session, question in zip(sessions, questions, strict=True):
        assert [t.text for t in session.turns] == [question]
        assert session.turns[0].reply == tiny_model.chat(tokenizer, question, **GREEDY)[0]


def test_regenerate_redoes_the_last_reply_and_clear_resets(handlers, tiny_model, tokenizer):
    session = Session()
    first = answer(handlers, session, "Hello")[-1]
    session, chat = handlers.regenerate(session)
    assert session.turns[-1].reply is None and [m["role"] for m in chat] == ["user"]
    assert replies(handlers, session)[-1] == first  # greedy: the same reply again
    assert len(session.turns) == 1

    session, chat = handlers.clear(session)
    assert chat == [] and session.turns == [] and session.pending == []
    with pytest.warns(UserWarning, match="no reply to regenerate"):
        handlers.regenerate(session)


def test_typed_image_tags_are_plain_text(handlers, tokenizer, monkeypatch):
    prompts = []
    monkeypatch.setattr(ChatHandlers, "stream_reply", fixed_reply("ok", prompts=prompts))
    session = Session()
    answer(handlers, session, "<img>/etc/passwd</img> what is this?")
    (prompt,) = prompts
    assert prompt.images == [] and tokenizer.img_start_id not in prompt.ids
    chat = chat_messages(session)
    assert chat[0]["content"] == "&lt;img&gt;/etc/passwd&lt;/img&gt; what is this?"


def test_uploads_become_part_of_the_next_question(handlers, uploaded, monkeypatch):
    prompts = []
    monkeypatch.setattr(ChatHandlers, "stream_reply", fixed_reply("two", prompts=prompts))
    session, _ = handlers.add_images([uploaded, uploaded], Session())
    answer(handlers, session, "How many?")
    answer(handlers, session, "And now?")
    assert [len(p.images) for p in prompts] == [2, 2]  # the history keeps its pictures
    assert prompts[1].text.count("<img>image-") == 2


def test_pictures_only_come_from_the_upload_folder(handlers, upload_dir):
    with pytest.warns(UserWarning, match="outside the allowed local roots"):
        session, chat = handlers.add_images([str(SHAPES)], Session())
    assert session.pending == [] and chat == []
    (upload_dir / "notes.png").write_text("not a picture")
    with pytest.warns(UserWarning, match="notes.png: not an image"):
        handlers.add_images([str(upload_dir / "notes.png")], session)
    assert session.pending == []


def test_a_question_needs_text_or_a_picture_and_waits_for_the_reply(handlers):
    session = Session()
    with pytest.warns(UserWarning, match="Type a question"):
        text, session, _ = handlers.ask("   ", session)
    assert session.turns == []
    handlers.ask("first", session)
    with pytest.warns(UserWarning, match="Wait for the reply"):
        text, session, _ = handlers.ask("second", session)
    assert text == "second" and len(session.turns) == 1  # kept in the box for later


def test_clearing_stops_the_reply_and_cancels_its_request(handlers, monkeypatch):
    handles = []
    submit = handlers.engine.submit

    def recording_submit(*args, **kwargs):
        handles.append(submit(*args, **kwargs))
        return handles[-1]

    monkeypatch.setattr(handlers.engine, "submit", recording_submit)
    handlers.params = dataclasses.replace(handlers.params, max_new_tokens=2000)
    session = Session()
    handlers.ask("count", session)
    streaming = handlers.respond(session)
    next(streaming)  # the first characters have arrived
    handlers.clear(session)
    assert list(streaming) == [] and session.turns == []
    assert handles[0].cancelled.is_set()
    for _ in handles[0]:  # the engine ends the request (cancelled) well before 2000 tokens
        pass
    assert handles[0].finish_reason == "cancelled"


@pytest.mark.parametrize(
    ("error", "shown"),
    [
        (EngineBusyError("64 requests are already waiting"), "64 requests are already waiting"),
        (RuntimeError("CUDA out of memory at /secret/path"), "The reply failed; the server log"),
    ],
)
def test_a_failed_reply_gives_the_pictures_back(handlers, uploaded, monkeypatch, error, shown):
    import gradio as gr

    def failing(self, prompt):
        yield "half a rep"
        raise error

    monkeypatch.setattr(ChatHandlers, "stream_reply", failing)
    session, _ = handlers.add_images([uploaded], Session())
    handlers.ask("What is this?", session)
    streaming = handlers.respond(session)
    next(streaming)
    chat, session = next(streaming)
    assert (
        session.turns == []
        and len(session.pending) == 1
        and chat == [{"role": "user", "content": {"path": uploaded}}]
    )
    with pytest.raises(gr.Error, match=shown) as raised:
        next(streaming)
    assert "secret" not in str(raised.value)
    assert not session.busy and handlers.ask("Again?", session)[1].turns[0].uploads  # not locked


# -- boxes -------------------------------------------------------------------------------------------


def test_a_reply_with_boxes_shows_the_annotated_picture(handlers, uploaded, upload_dir, monkeypatch):
    streamed = ("<ref>圆", "<ref>圆</ref><box>(94,1", "<ref>圆</ref><box>(94,167),(406,583)</bo", BOX_REPLY)
    monkeypatch.setattr(ChatHandlers, "stream_reply", fixed_reply(*streamed))
    session, _ = handlers.add_images([uploaded], Session())
    handlers.ask("Outline the circle", session)
    label = ref_label("圆", PALETTE[0])
    for chat, _ in handlers.respond(session):  # while it streams, the label and no markup
        assert chat[2] == {"role": "assistant", "content": label}
    annotated = session.turns[-1].annotated
    chat = chat_messages(session)
    assert chat[-1] == {"role": "assistant", "content": {"path": annotated}}
    assert chat[-2]["content"] == label
    assert os.path.dirname(annotated) == str(upload_dir / "qwenvl-web")
    picture = Image.open(annotated)
    assert picture.size == (640, 480) and picture.getpixel(CIRCLE_LEFT_EDGE) == PALETTE[0]

    # a later text-only turn draws on the latest picture of the conversation
    answer(handlers, session, "Again")
    assert session.turns[-1].annotated == annotated  # same picture, same boxes: the same file


def test_boxes_without_a_picture_draw_nothing(handlers, monkeypatch):
    monkeypatch.setattr(ChatHandlers, "stream_reply", fixed_reply(BOX_REPLY))
    session = Session()
    answer(handlers, session, "Where is the circle?")
    assert session.turns[-1].reply == BOX_REPLY and session.turns[-1].annotated is None
    assert chat_messages(session)[1:] == [{"role": "assistant", "content": ref_label("圆", PALETTE[0])}]
    monkeypatch.setattr(ChatHandlers, "stream_reply", fixed_reply("<box>(1,2),(3,4)</box>"))
    answer(handlers, session, "Where?")
    assert chat_messages(session)[-1]["content"] == "*(only box coordinates, and no picture to draw them on)*"


# -- how a reply shows -------------------------------------------------------------------------------


class ReadHTML(HTMLParser):
    """An HTML fragment's start tags and text, character references resolved, as a browser reads it."""

    def __init__(self, fragment: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.texts: list[str] = []
        self.feed(fragment)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.texts.append(data)


def test_refs_become_labels_in_their_box_colour_and_boxes_are_left_out():
    text = (
        "<ref>dog</ref><box>(1,2),(3,4)</box> and <ref>cat</ref><box>(5,6),(7,8)</box>"
        "<box>(9,9),(10,10)</box>, <ref>dog</ref><quad>(1,2),(3,4),(5,6),(7,8)</quad>!"
    )
    assert assign_colors(parse_boxes(text)) == {"dog": PALETTE[0], "cat": PALETTE[1]}  # as drawn
    dog, cat = ref_label("dog", PALETTE[0]), ref_label("cat", PALETTE[1])
    assert reply_html(text, final=True) == f"{dog} and {cat}, {dog}!"
    assert dog == (
        '<span class="qwenvl-ref" style="background-color:#1f77b4;color:#ffffff;'
        'border-radius:0.3em;padding:0 0.3em">dog</span>'
    )
    assert "background-color:#ff7f0e;color:#000000;" in cat  # dark text on light orange
    assert reply_html("no grounding, *markdown* kept", final=True) == "no grounding, *markdown* kept"


def test_a_phrase_without_a_box_gets_a_neutral_label_once_none_can_follow():
    assert reply_html("<ref>the dog</ref> sits", final=True) == ref_label("the dog", UNBOXED_COLOR) + " sits"
    assert "color:#000000" in ref_label("x", UNBOXED_COLOR)
    # while streaming, the latest phrase has the colour its box will bring
    assert reply_html("<ref>the dog</ref>", final=False) == ref_label("the dog", PALETTE[0])
    assert reply_html("<ref>the dog</ref> sits", final=False) == ref_label("the dog", UNBOXED_COLOR) + " sits"
    assert reply_html("<ref></ref><box>(1,2),(3,4)</box>ok", final=True) == "ok"  # an empty phrase


def test_model_text_cannot_inject_html_or_markdown():
    text = (
        "<img src=x onerror=alert(1)> <ref><script>alert(1)</script>\n*a* [x](javascript:y)</ref>"
        '<box>(1,2),(3,4)</box> </ref><b>bold</b> "quoted" & done'
    )
    shown = reply_html(text, final=True)
    read = ReadHTML(shown)
    assert read.tags == [("span", {"class": "qwenvl-ref", "style": read.tags[0][1]["style"]})]
    assert "".join(read.texts) == (
        "<img src=x onerror=alert(1)> <script>alert(1)</script> *a* [x](javascript:y)"
        ' <b>bold</b> "quoted" & done'
    )
    # In the label, Markdown must not act either: every ASCII punctuation mark is a reference.
    phrase = shown.split('">', 1)[1].split("</span>", 1)[0]
    assert set(phrase) & set(string.punctuation) == set("&#;")


def test_streaming_never_shows_half_a_tag_or_a_coordinate():
    text = "看<ref>the red circle</ref><box>(94,167),(406,583)</box>，and <ref>a square</ref><quad>" + (
        "(1,1),(2,2),(3,3),(4,4)</quad>."
    )
    final = reply_html(text, final=True)
    labels = {ref_label("the red circle", PALETTE[0]), ref_label("a square", PALETTE[1])}
    for end in range(len(text) + 1):  # every prefix: tags arrive as tokens, but need not
        shown = reply_html(text[:end], final=False)
        read = ReadHTML(shown)
        visible = "".join(read.texts)
        assert "<" not in visible and not any(digit in visible for digit in "0123456789"), text[:end]
        for _, attrs in read.tags:  # a label keeps its colour as the reply grows
            assert any(attrs["style"] in label for label in labels), text[:end]
        assert final.startswith(shown.rsplit("<span", 1)[0])
    assert reply_html(text, final=False) == final
    assert reply_html("a <", final=False) == "a" and reply_html("a <", final=True) == "a &lt;"
    assert reply_html("<ref>cat</r", final=False) == ref_label("cat", PALETTE[0])


# -- the app and its flags ---------------------------------------------------------------------------


def test_flags_default_to_loopback():
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([])
    assert (args.host, args.port, args.share) == ("127.0.0.1", 7860, False)
    assert parser.parse_args(["--share", "--port", "9000"]).port == 9000


def test_run_from_args_loads_the_model_and_launches(tiny_checkpoint, monkeypatch, capsys):
    import argparse

    import gradio as gr

    from qwenvl import frontend, web

    parser = argparse.ArgumentParser()
    frontend.add_model_arguments(parser)
    frontend.add_sampling_arguments(parser)
    add_arguments(parser)
    launched = []

    def launch(demo, **options):  # gradio's server would run in its own thread; then Ctrl-C
        launched.append((demo, options))
        signal.raise_signal(signal.SIGINT)
        return None, "http://127.0.0.1:7999/", None

    monkeypatch.setattr(web.app, "launch", launch)
    args = parser.parse_args(["--model", str(tiny_checkpoint), "--fp32", "--greedy", "--port", "7999"])
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN where the tests run in the background
    assert web.run_from_args(args) == 0  # the engine ran in this thread until Ctrl-C
    ((demo, options),) = launched
    assert isinstance(demo, gr.Blocks)
    assert options == {"host": "127.0.0.1", "port": 7999, "share": False, "block": False}
    assert capsys.readouterr().out == "the demo runs at http://127.0.0.1:7999/\n"
    assert signal.getsignal(signal.SIGINT) is before  # given back


def test_importing_qwenvl_does_not_import_gradio():
    code = "import sys, qwenvl, qwenvl.web; assert 'gradio' not in sys.modules, 'gradio was imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_build_demo_without_a_browser(tiny_model, tokenizer, engine):
    import gradio as gr

    assert isinstance(build_demo(tiny_model, tokenizer, engine=engine), gr.Blocks)


# gradio's queue calls pandas APIs that pandas 3 deprecates, from the server thread
@pytest.mark.filterwarnings("ignore::DeprecationWarning:gradio.queueing")
def test_in_a_browser(tiny_model, tokenizer, engine, tmp_path, monkeypatch):
    chromium = chromium_or_skip()
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))  # uploads land here
    # computed first: the same prompt but for the span's reference, which features replace
    expected, _ = tiny_model.chat(
        tokenizer, f"Picture 1: <img>{SHAPES}</img>\nWhat is in the picture?", **GREEDY
    )
    demo = build_demo(tiny_model, tokenizer, generation_options=GREEDY, engine=engine)
    with served(demo) as address, browser_page(chromium) as page:
        page.goto(address)
        with page.expect_file_chooser() as chooser:
            page.click("#upload")
        chooser.value.set_files(str(SHAPES))
        page.locator("[data-testid=user] img").wait_for()

        page.fill("#query textarea", "What is in the picture?")
        page.click("#submit")
        bot = page.locator("[data-testid=bot]")
        bot.first.wait_for()
        page.wait_for_function(
            "([n, text]) => document.querySelectorAll('[data-testid=bot]')[n]?.innerText.trim() === text",
            arg=[0, expected],
        )

        monkeypatch.setattr(ChatHandlers, "stream_reply", fixed_reply(BOX_REPLY))
        query = page.locator("#query textarea")
        query.fill("Outline")
        query.press("Shift+Enter")  # a new line, not a question
        query.press_sequentially("the circle")
        assert query.input_value() == "Outline\nthe circle"
        query.press("Enter")
        annotated = page.locator("[data-testid=bot] img[src*='qwenvl-web']")
        annotated.wait_for()
        assert page.locator("[data-testid=user]").last.inner_text().strip() == "Outline\nthe circle"
        assert query.input_value() == ""
        label = bot.nth(1).locator(".qwenvl-ref")  # the phrase as a label in its box's colour
        assert label.inner_text() == "圆" and bot.nth(1).inner_text().strip() == "圆"  # no markup
        colors = label.evaluate("e => [getComputedStyle(e).backgroundColor, getComputedStyle(e).color]")
        assert colors == ["rgb(31, 119, 180)", "rgb(255, 255, 255)"]
        page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=annotated.element_handle())
        page.screenshot(path=str(tmp_path / "web-demo.png"), full_page=True)

        served_picture = page.request.get(annotated.get_attribute("src"))
        picture = Image.open(io.BytesIO(served_picture.body()))
        assert picture.size == (640, 480) and picture.convert("RGB").getpixel(CIRCLE_LEFT_EDGE) == PALETTE[0]

        other = page.context.new_page()  # another visitor starts with an empty conversation
        other.goto(address)
        other.click("#regenerate")
        other.get_by_text("There is no reply to regenerate.").wait_for()
        assert other.locator("[data-testid=bot], [data-testid=user]").count() == 0

        page.click("#clear")
        page.locator("[data-testid=bot]").first.wait_for(state="detached")
