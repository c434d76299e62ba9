"""The `qwenvl` command: ask (plain, JSON, boxes, errors), help and version, serve/web dispatch, chat,
progress reporting, and the packaging around it (Docker files, LICENSE)."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import select
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
from PIL import Image

import qwenvl
from qwenvl import cli, frontend
from qwenvl.progress import Progress, format_duration, show_logs
from qwenvl.version import UNKNOWN, source_tree_version

ROOT = Path(__file__).resolve().parents[1]
SHAPES = "tests/data/images/shapes.png"  # relative to ROOT, as a user would type it
GROUNDED = "<ref>圆</ref><box>(100,100),(400,600)</box>"


def greedy(model, tokenizer, query: str, history=None, max_new_tokens: int = 8) -> tuple[str, list]:
    return model.chat(tokenizer, query, history=history, do_sample=False, max_new_tokens=max_new_tokens)


@pytest.fixture
def at_root(monkeypatch) -> Path:
    monkeypatch.chdir(ROOT)
    return ROOT


@pytest.fixture
def preloaded(monkeypatch, tiny_checkpoint, tokenizer, tiny_model) -> frontend.LoadedModel:
    """ask and chat get the session's tiny model instead of loading the checkpoint again."""
    loaded = frontend.LoadedModel(str(tiny_checkpoint), tokenizer, tiny_model)
    monkeypatch.setattr(frontend, "load_from_args", lambda args, show_progress=None: loaded)
    return loaded


@pytest.fixture
def grounded_reply(monkeypatch, tiny_model) -> None:
    """The model's stream yields a grounded reply, growing as a real one does."""

    def chat_stream(tokenizer, query, history=None, **kwargs):
        yield GROUNDED[:8]
        yield GROUNDED

    monkeypatch.setattr(tiny_model, "chat_stream", chat_stream)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# -- ask --------------------------------------------------------------------------------------------


def test_ask_prints_the_greedy_reply(capsys, at_root, tiny_checkpoint, tokenizer, tiny_model):
    argv = ["--model", str(tiny_checkpoint), "--greedy", "--max-new-tokens", "8", "--image", SHAPES]
    code, out, err = run(capsys, "ask", *argv, "What is this?")
    query = tokenizer.from_list_format([{"image": SHAPES}, {"text": "What is this?"}])
    assert code == 0
    assert out == greedy(tiny_model, tokenizer, query)[0] + "\n"
    assert err == ""  # piped: no progress bar, no chatter


def test_ask_json_has_reply_usage_and_timings(capsys, at_root, preloaded, tokenizer, tiny_model):
    code, out, _ = run(capsys, "ask", "--greedy", "--max-new-tokens", "8", "--json", "Hello")
    report = json.loads(out)
    assert code == 0
    assert report["response"] == greedy(tiny_model, tokenizer, "Hello")[0]
    assert report["boxes"] == [] and report["boxes_image"] is None
    assert report["usage"]["prompt_tokens"] > 5
    assert 0 < report["usage"]["completion_tokens"] <= 9  # re-encoding may split differently
    assert set(report["timings"]) == {"load_s", "first_token_s", "total_s", "tokens_per_s"}
    assert report["timings"]["first_token_s"] <= report["timings"]["total_s"]


def test_ask_draws_the_reply_boxes(capsys, at_root, preloaded, grounded_reply, tmp_path):
    target = tmp_path / "out" / "boxes.png"
    code, out, err = run(capsys, "ask", "--image", SHAPES, "--save-boxes", str(target), "Circle?")
    assert code == 0
    assert out == GROUNDED + "\n"
    assert str(target) in err
    with Image.open(target) as drawn, Image.open(SHAPES) as original:
        assert drawn.size == original.size
        assert drawn.convert("RGB").tobytes() != original.convert("RGB").tobytes()


def test_ask_json_gives_pixel_boxes(capsys, at_root, preloaded, grounded_reply, tmp_path):
    target = tmp_path / "boxes.png"
    code, out, _ = run(capsys, "ask", "--image", SHAPES, "--save-boxes", str(target), "--json", "Circle?")
    report = json.loads(out)
    w, h = Image.open(SHAPES).size
    assert code == 0
    assert report["boxes_image"] == str(target) and target.exists()
    expected = [int(0.1 * w), int(0.1 * h), int(0.4 * w), int(0.6 * h)]  # the original truncates
    assert report["boxes"] == [{"phrase": "圆", "box": [100, 100, 400, 600], "pixels": expected}]


def test_ask_without_an_image_saves_no_picture(capsys, preloaded, grounded_reply, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "ask", "Where is the circle?")
    assert (code, out, err) == (0, GROUNDED + "\n", "")
    assert list(tmp_path.iterdir()) == []


def test_missing_image_fails_before_loading(capsys, monkeypatch, tmp_path):
    def load(args, show_progress=None):
        raise AssertionError("the model must not load when an image is missing")

    monkeypatch.setattr(frontend, "load_from_args", load)
    missing = tmp_path / "no-such-picture.png"
    for command in (["ask", "--image", str(missing), "What?"], ["chat", "--image", str(missing)]):
        code, out, err = run(capsys, *command)
        assert code == 2 and out == ""
        assert err.startswith("qwenvl: error: ") and "no-such-picture.png" in err
        assert "Traceback" not in err and err.count("\n") == 1


@pytest.mark.parametrize("kind", ["empty folder", "no such folder"])
def test_bad_model_folder_is_one_error_line(capsys, tmp_path, kind):
    folder = tmp_path / "model"
    if kind == "empty folder":
        folder.mkdir()
    code, out, err = run(capsys, "ask", "--model", str(folder), "Hello")
    assert code == 2 and out == ""
    assert err.startswith("qwenvl: error: ") and str(folder) in err and err.count("\n") == 1


def test_unknown_option_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["ask", "--no-such-flag", "Hello"])
    assert exit_info.value.code == 2
    assert "--no-such-flag" in capsys.readouterr().err


# -- help -------------------------------------------------------------------------------------------


@pytest.fixture
def stand_ins(monkeypatch) -> dict[str, types.ModuleType]:
    """Stand-ins for qwenvl.server and qwenvl.web that record the arguments they are run with."""
    modules = {}
    for name, flag in (("server", "--port"), ("web", "--share")):
        module = types.ModuleType(f"qwenvl.{name}")
        module.add_arguments = lambda parser, flag=flag: parser.add_argument(flag, help=f"stand-in {flag}")
        module.calls = []
        module.run_from_args = lambda args, module=module: module.calls.append(args) or 0
        monkeypatch.setitem(sys.modules, module.__name__, module)
        modules[name] = module
    return modules


def test_top_level_help_lists_every_command_with_examples(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    for command in ("ask", "chat", "serve", "web"):
        assert f"qwenvl {command}" in out  # each has an example line
    assert "--version" in out
    # the default model is the trained demo model, and the help says what it can answer
    assert "bundled demo model" in out and "coloured shapes" in out
    assert "noise" not in out and "random" not in out


def test_version_is_the_installed_packages(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"qwenvl {qwenvl.__version__}\n"
    from importlib import metadata

    assert qwenvl.__version__ == metadata.version("qwenvl")


def test_a_source_tree_without_metadata_reads_pyproject(tmp_path):
    # the editable install's metadata was written from this pyproject.toml
    assert source_tree_version(ROOT / "pyproject.toml") == qwenvl.__version__
    assert source_tree_version(tmp_path / "missing.toml") == UNKNOWN
    other = tmp_path / "pyproject.toml"
    other.write_text('[project]\nname = "other"\nversion = "9.9"\n')
    assert source_tree_version(other) == UNKNOWN


@pytest.mark.parametrize(
    "command, options",
    [
        ("ask", ["--image", "--json", "--save-boxes", "--model", "--greedy", "--seed", "examples:"]),
        ("chat", ["--image", "--save-dir", ":image", ":clear", ":history", ":quit", "--model", "examples:"]),
        ("serve", ["--port", "--model", "--greedy", "qwenvl[server]", "example:"]),
        ("web", ["--share", "--model", "--temperature", "qwenvl[web]", "example:"]),
        ("finetune", ["--lora", "--logging-steps", "progress line", "qwenvl[finetune]", "example:"]),
        ("eval", ["--scenes", "bundled demo model", "example:"]),
    ],
)
def test_command_help_teaches_its_options(capsys, stand_ins, command, options):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines at the terminal width
    assert exit_info.value.code == 0
    for option in options:
        assert option in out


# -- serve and web ----------------------------------------------------------------------------------


@pytest.mark.parametrize("command, module, flag", [("serve", "server", "--port"), ("web", "web", "--share")])
def test_serve_and_web_dispatch_to_their_module(capsys, stand_ins, command, module, flag):
    code, _, _ = run(capsys, command, "--model", "some/model", "--greedy", flag, "7")
    (args,) = stand_ins[module].calls
    assert code == 0
    assert args.model == "some/model" and args.greedy and getattr(args, flag[2:]) == "7"


@pytest.mark.parametrize("command, extra", [("serve", "server"), ("web", "web")])
def test_missing_module_names_the_extra(capsys, monkeypatch, command, extra):
    monkeypatch.setitem(sys.modules, f"qwenvl.{extra}", None)  # makes the import fail
    code, out, err = run(capsys, command, "--model", "m", "--option-only-the-module-knows", "1")
    assert code == 2 and out == ""
    assert err.startswith(f"qwenvl: error: qwenvl {command} needs the {extra} extra")
    assert f"pip install 'qwenvl[{extra}]'" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert command in capsys.readouterr().out


def test_lora_without_peft_names_the_extra_before_loading(capsys, monkeypatch, tmp_path):
    from qwenvl.finetune import main as finetune_main

    monkeypatch.setitem(sys.modules, "peft", None)  # makes the import fail
    # neither the model nor the data exist: the check comes before either is read
    argv = ["--model", str(tmp_path / "model"), "--data", str(tmp_path / "train.json")]
    argv += ["--output", str(tmp_path / "out"), "--lora"]
    code, out, err = run(capsys, "finetune", *argv)
    assert code == 2 and out == ""
    assert err == (
        "qwenvl: error: qwenvl finetune needs the finetune extra (cannot import peft): "
        "pip install 'qwenvl[finetune]'\n"
    )
    assert finetune_main(argv) == 2  # python -m qwenvl.finetune
    assert "needs the finetune extra" in capsys.readouterr().err


def test_dependency_missing_at_run_time_names_it(capsys, stand_ins):
    def run_from_args(args):
        raise ModuleNotFoundError("No module named 'fastapi'", name="fastapi")

    stand_ins["server"].run_from_args = run_from_args
    code, _, err = run(capsys, "serve")
    assert code == 2 and "fastapi" in err and "pip install 'qwenvl[server]'" in err


def test_qwenvls_own_import_errors_are_not_hidden(stand_ins):
    def run_from_args(args):
        raise ModuleNotFoundError("No module named 'qwenvl.gone'", name="qwenvl.gone")

    stand_ins["web"].run_from_args = run_from_args
    with pytest.raises(ModuleNotFoundError):
        cli.main(["web"])


def test_ctrl_c_exits_130_quietly(capsys, stand_ins):
    def run_from_args(args):
        raise KeyboardInterrupt

    stand_ins["server"].run_from_args = run_from_args
    assert run(capsys, "serve") == (130, "", "")


def test_import_and_ask_parser_leave_the_extras_alone():
    code = (
        "import sys; from qwenvl import cli; cli.build_parser('ask').parse_args(['ask', 'q']); "
        "print(sorted({'fastapi', 'gradio', 'qwenvl.server', 'qwenvl.web'} & set(sys.modules)))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "[]", result.stderr


# -- chat, in process (stdin is not a terminal) -----------------------------------------------------


def chat_session(capsys, monkeypatch, lines: list[str], *argv: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(f"{line}\n" for line in lines)))
    return run(capsys, "chat", "--greedy", "--max-new-tokens", "4", *argv)


def test_chat_commands(capsys, monkeypatch, at_root, preloaded, tokenizer, tiny_model):
    lines = [":help", ":image", "/image tests/data/images/none.png", ":image " + SHAPES, "What is it?"]
    lines += [":history", ":clear", ":history", ":bogus", ":quit", "never asked"]
    code, out, err = chat_session(capsys, monkeypatch, lines)
    query = tokenizer.from_list_format([{"image": SHAPES}, {"text": "What is it?"}])
    reply = greedy(tiny_model, tokenizer, query, max_new_tokens=4)[0]
    assert code == 0
    assert ":history" in out and "attached to your next question: nothing" in out
    assert "none.png" in err and err.count("qwenvl: error:") == 1
    assert f"{cli.REPLY_PREFIX}{reply}\n" in out
    assert f"[1] you: Picture 1: <img>{SHAPES}</img>" in out
    assert "(conversation cleared)" in out and "(no conversation yet)" in out
    assert "unknown command ':bogus'" in out


def test_chat_saves_boxes_per_turn(capsys, monkeypatch, at_root, preloaded, grounded_reply, tmp_path):
    code, out, _ = chat_session(
        capsys, monkeypatch, ["Where?", "And now?"], "--image", SHAPES, "--save-dir", str(tmp_path)
    )
    assert code == 0
    assert out.count(f"{cli.REPLY_PREFIX}{GROUNDED}\n") == 2
    for turn in (1, 2):  # the second turn still finds the first turn's picture
        path = tmp_path / f"qwenvl-turn-{turn}.png"
        assert path.exists() and f"(boxes drawn on {path})" in out


def test_ctrl_c_during_a_reply_returns_to_the_prompt(capsys, monkeypatch, preloaded, tiny_model):
    def chat_stream(tokenizer, query, history=None, **kwargs):
        yield "partial"
        raise KeyboardInterrupt

    monkeypatch.setattr(tiny_model, "chat_stream", chat_stream)
    code, out, _ = chat_session(capsys, monkeypatch, ["Hi", ":history"])
    assert code == 0
    assert "(reply interrupted)" in out and "(no conversation yet)" in out


# -- chat in a pseudo-terminal ----------------------------------------------------------------------


class Terminal:
    """A child process on a pseudo-terminal, read with timeouts (a tiny stand-in for pexpect)."""

    def __init__(self, argv: list[str], cwd: Path, env: dict[str, str]):
        self.fd, child = os.openpty()
        self.process = subprocess.Popen(argv, stdin=child, stdout=child, stderr=child, cwd=cwd, env=env)
        os.close(child)
        self.raw = b""
        self.position = 0

    @property
    def text(self) -> str:
        return self.raw.decode("utf-8", errors="replace").replace("\r\n", "\n")

    def expect(self, wanted: str, timeout: float) -> str:
        """Wait for `wanted` after what earlier calls consumed; return the text before it."""
        deadline = time.monotonic() + timeout
        while (found := self.text.find(wanted, self.position)) < 0:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._read(remaining):
                raise AssertionError(f"{wanted!r} did not appear; the terminal shows:\n{self.text}")
        before, self.position = self.text[self.position : found], found + len(wanted)
        return before

    def _read(self, timeout: float) -> bool:
        if select.select([self.fd], [], [], timeout)[0]:
            try:
                chunk = os.read(self.fd, 65536)
            except OSError:  # EIO: the child closed the terminal
                chunk = b""
            self.raw += chunk
            return bool(chunk)
        return True  # timed out: let expect's deadline decide

    def send(self, line: str) -> None:
        os.write(self.fd, line.encode() + b"\r")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        os.close(self.fd)


def test_chat_in_a_terminal_streams_two_turns(at_root, tiny_checkpoint, tokenizer, tiny_model):
    first_query = tokenizer.from_list_format([{"image": SHAPES}, {"text": "What is in the picture?"}])
    first, history = greedy(tiny_model, tokenizer, first_query, max_new_tokens=6)
    second = greedy(tiny_model, tokenizer, "And its colour?", history, max_new_tokens=6)[0]

    env = {**os.environ, "TERM": "dumb"}
    env.pop("QWENVL_MODEL", None)
    argv = [sys.executable, "-m", "qwenvl", "chat", "--model", str(tiny_checkpoint), "--greedy"]
    terminal = Terminal([*argv, "--max-new-tokens", "6"], ROOT, env)
    try:
        terminal.expect(cli.PROMPT, timeout=180)  # importing torch and loading on a busy machine
        terminal.send(f":image {SHAPES}")
        terminal.expect(cli.PROMPT, timeout=30)
        terminal.send("What is in the picture?")
        terminal.expect(cli.REPLY_PREFIX, timeout=30)
        assert terminal.expect(cli.PROMPT, timeout=60) == first + "\n"
        terminal.send("And its colour?")
        terminal.expect(cli.REPLY_PREFIX, timeout=30)
        assert terminal.expect(cli.PROMPT, timeout=60) == second + "\n"
        terminal.send(":quit")
        assert terminal.process.wait(timeout=30) == 0
    finally:
        terminal.close()


# -- progress reporting -----------------------------------------------------------------------------


class Clock:
    """A clock the test moves: durations and estimates exact, whatever the machine's speed."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_lines_every_n_with_the_time_left():
    stream, clock = io.StringIO(), Clock()
    progress = Progress(10, "step", initial=2, every=4, stream=stream, clock=clock)
    for _ in range(8):
        clock.now += 3.0  # 3 s a step
        progress.update(1, "loss 1.0")
    progress.close()
    # steps 4 and 8 (multiples of 4) and 10 (the last); the rate counts only this run's steps
    assert stream.getvalue().splitlines() == [
        "step 4/10 loss 1.0 | 0:06 elapsed, 0:18 left",
        "step 8/10 loss 1.0 | 0:18 elapsed, 0:06 left",
        "step 10/10 loss 1.0 | 0:24 elapsed",
    ]


def test_progress_bar_on_a_terminal():
    stream = io.StringIO()
    with Progress(3, "eval", unit="item", stream=stream, bar=True) as progress:
        progress.write("a message above the bar")
        for _ in range(3):
            progress.update(1, "mean score 0.500")
    shown = stream.getvalue()
    assert "a message above the bar\n" in shown
    assert "\r" in shown and "3/3" in shown and "mean score 0.500" in shown
    assert not re.search(r"^eval \d+/3 ", shown, re.MULTILINE)  # no plain lines


def test_format_duration():
    assert [format_duration(s) for s in (0, 59.4, 61, 3600, 36000 + 62)] == [
        "0:00",
        "0:59",
        "1:01",
        "1:00:00",
        "10:01:02",
    ]


def test_show_logs_writes_the_packages_records_as_lines():
    lines = []
    logger = logging.getLogger("qwenvl.some.module")
    with show_logs(lines.append):
        logger.info("saved %s", "out/checkpoint-2")
        logger.warning("resuming with other settings")
        logger.debug("not shown")
    logger.info("after the block")
    assert lines == ["saved out/checkpoint-2", "warning: resuming with other settings"]
    assert logging.getLogger("qwenvl").handlers == []


# -- packaging --------------------------------------------------------------------------------------


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined and comments left out."""
    text = re.sub(r"\\\n", " ", path.read_text(encoding="utf-8"))
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
        for line in lines
        if line and not line.startswith("#")
    ]


def makefile_torch_pin() -> str:
    match = re.search(r"^TORCH_CPU := torch==(\S+)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert match, "the Makefile pins the CPU build of torch"
    return match.group(1)


@pytest.mark.parametrize(
    "name, base, wheel_index",
    [("Dockerfile", "python:3.11-slim", "/whl/cpu"), ("Dockerfile.cuda", "nvidia/cuda:", "/whl/cu")],
)
def test_dockerfiles_serve_the_pinned_torch_as_a_user(name, base, wheel_index):
    instructions = dockerfile_instructions(ROOT / name)
    values = {}
    for instruction, arguments in instructions:
        values.setdefault(instruction, []).append(arguments)
    assert values["FROM"] == [values["FROM"][0]] and values["FROM"][0].startswith(base)
    args = dict(arg.split("=", 1) for arg in values["ARG"])
    assert args["TORCH_VERSION"] == makefile_torch_pin()
    assert wheel_index in args["TORCH_INDEX"]
    runs = " ".join(values["RUN"])
    assert 'pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"' in runs
    assert 'pip install ".[server]"' in runs
    assert "python -m qwenvl.demo" in runs  # the bundled demo model answers at build time, offline
    user = values["USER"][-1]
    assert user not in ("root", "0")
    assert [i for i, _ in instructions].index("USER") < [i for i, _ in instructions].index("ENTRYPOINT")
    command = json.loads(values["ENTRYPOINT"][-1]) + json.loads(values["CMD"][-1])
    port = command[command.index("--port") + 1]
    assert command[:2] == ["qwenvl", "serve"] and command[command.index("--host") + 1] == "0.0.0.0"
    assert values["EXPOSE"] == [port]


def test_dockerignore_keeps_the_environment_out():
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    ignored = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert {".venv", "build", ".git", "**/__pycache__"} <= set(ignored)
    assert not {"src", "pyproject.toml", "LICENSE", "README.md"} & set(ignored)


def test_license_is_apache_2_and_in_the_package_metadata():
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert "END OF TERMS AND CONDITIONS" in text and "APPENDIX: How to apply" in text
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert re.search(r'^license = "Apache-2.0"$', pyproject, re.MULTILINE)
    assert re.search(r'^license-files = \["LICENSE",', pyproject, re.MULTILINE)
