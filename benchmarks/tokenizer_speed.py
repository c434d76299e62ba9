"""Tokenizer speed: `QwenVLTokenizer.encode`/`decode` against the original Qwen tokenizer's algorithm.

Run: .venv/bin/python -m benchmarks.tokenizer_speed [--megabytes 1.0] [--repeats 10] [--json PATH]

The text is ~1 MB of generated, deterministic mixed Chinese/English prose with numbers, code,
grounding tags and a few `<img>` spans. The baseline is `OriginalAlgorithm` below, a
re-implementation of what the original QWenTokenizer did per token; both use the same tiktoken
Encoding and vocabulary dicts, so the ratio isolates the Python work around tiktoken. Plain
tiktoken (which cannot expand image spans) is timed as the floor either could reach.
"""

from __future__ import annotations

import argparse
import random
import unicodedata
from collections.abc import Callable, Sequence

from qwenvl import QwenVLTokenizer
from qwenvl.tokenizer import IMAGE_SPAN

from .common import OtherLoad, Timing, add_json_option, json_path, markdown_table, save_record, time_call

MB = 1e6  # bytes; MB/s figures count the UTF-8 bytes of the text

ENGLISH_WORDS = (
    "the a picture shows dog cat person red blue small large table window street car tree holding "
    "next to behind under model answers question about image left right corner bright dark old new "
    "people walking sitting standing near building sky cloud water boat bicycle phone book cup"
).split()
CHINESE_CLAUSES = (
    "这是一张照片",
    "照片里有一只狗在草地上奔跑",
    "请描述图片中的内容",
    "模型会先读取图像然后回答问题",
    "今天的天气很好",
    "我们去公园散步吧",
    "图中左上角有一个红色的杯子",
    "桌子上放着三本书和一部手机",
    "街道两旁种满了高大的树木",
    "一位老人坐在长椅上看报纸",
    "远处的山被白云遮住了",
    "这个模型可以理解中文和英文",
)
CHINESE_ENDINGS = ("。", "！", "？", "；")
CODE_SNIPPETS = (
    "def area(box):\n    (x1, y1), (x2, y2) = box\n    return (x2 - x1) * (y2 - y1)\n",
    'for i in range(10):\n    print(f"{i:03d}", i ** 2)\n',
    "if (width > 448 && height > 448) { scale = 448.0 / max(width, height); }\n",
    "SELECT name, COUNT(*) FROM images WHERE label = 'dog' GROUP BY name;\n",
)
REFERENCE_NOUNS = ("the dog", "a red cup", "左边的人", "the bicycle", "窗户", "the old man")


def english_sentence(rng: random.Random) -> str:
    words = rng.choices(ENGLISH_WORDS, k=rng.randint(6, 18))
    return " ".join(words).capitalize() + rng.choice((".", "?", "!", ";"))


def chinese_sentence(rng: random.Random) -> str:
    return "，".join(rng.choices(CHINESE_CLAUSES, k=rng.randint(1, 3))) + rng.choice(CHINESE_ENDINGS)


def numbers(rng: random.Random) -> str:
    return f"{rng.randint(0, 10**6)} items, {rng.uniform(0, 1000):.2f}% ({rng.randint(1990, 2030)}年)"


def grounding(rng: random.Random) -> str:
    x1, y1 = rng.randint(0, 900), rng.randint(0, 900)
    x2, y2 = rng.randint(x1, 999), rng.randint(y1, 999)
    return f"<ref>{rng.choice(REFERENCE_NOUNS)}</ref><box>({x1},{y1}),({x2},{y2})</box>"


def paragraph(rng: random.Random) -> str:
    pieces: list[Callable[[random.Random], str]] = [english_sentence] * 4 + [chinese_sentence] * 4
    pieces += [numbers, grounding, lambda r: r.choice(CODE_SNIPPETS)]
    return " ".join(rng.choice(pieces)(rng) for _ in range(rng.randint(3, 8))) + "\n\n"


def mixed_text(megabytes: float, seed: int = 0, paragraphs_per_image: int = 250) -> str:
    """Deterministic mixed-language text of about `megabytes` MB, an image span every so often."""
    rng = random.Random(seed)
    parts: list[str] = []
    size = 0
    while size < megabytes * MB:
        if len(parts) % paragraphs_per_image == 0:
            number = len(parts) // paragraphs_per_image + 1
            part = f"Picture {number}: <img>images/photo_{number:04d}.jpg</img>\n"
        else:
            part = paragraph(rng)
        parts.append(part)
        size += len(part.encode("utf-8"))
    return "".join(parts)


class OriginalAlgorithm:
    """A re-implementation, for comparison only, of the original QWenTokenizer's per-token detour.

    Encoding: tiktoken ids -> each id's surface form (bytes, or str for a special token) through a
    decoder dict -> a Python scan of that token list for `<img>..</img>` -> `convert_tokens_to_ids`
    looks every token up again in a dict. Decoding: a Python scan of the ids for image spans,
    whose reference is re-encoded, then tiktoken decode.
    """

    def __init__(self, tok: QwenVLTokenizer):
        self.encoding = tok.tokenizer
        self.mergeable_ranks = tok.mergeable_ranks
        self.special_tokens = tok.special_tokens
        # built once up front, as the original's __init__ did
        self.decoder: dict[int, bytes | str] = {rank: token for token, rank in self.mergeable_ranks.items()}
        self.decoder.update({rank: token for token, rank in self.special_tokens.items()})
        self.img_start_id, self.img_end_id = tok.img_start_id, tok.img_end_id
        self.img_pad_id = tok.img_pad_id

    def tokenize(self, text: str) -> list[bytes | str]:
        text = unicodedata.normalize("NFC", text)
        tokens = [self.decoder[i] for i in self.encoding.encode(text, allowed_special="all")]
        return replace_closed_spans(tokens, "<img>", "</img>", self._expand_image_tokens)

    def _expand_image_tokens(self, span: list[bytes | str]) -> list[bytes | str]:
        reference = b"".join(span[1:-1])
        if len(reference) > IMAGE_SPAN:
            raise ValueError(f"image reference of {len(reference)} bytes is longer than {IMAGE_SPAN}")
        inner = [self.decoder[byte] for byte in reference]  # id b is the single byte b
        return ["<img>", *inner, *["<imgpad>"] * (IMAGE_SPAN - len(inner)), "</img>"]

    def convert_tokens_to_ids(self, tokens: Sequence[bytes | str]) -> list[int]:
        return [self.special_tokens[t] if isinstance(t, str) else self.mergeable_ranks[t] for t in tokens]

    def encode(self, text: str) -> list[int]:
        return self.convert_tokens_to_ids(self.tokenize(text))

    def decode(self, ids: Sequence[int]) -> str:
        ids = replace_closed_spans(list(ids), self.img_start_id, self.img_end_id, self._collapse_image_ids)
        return self.encoding.decode(ids, errors="replace")

    def _collapse_image_ids(self, span: list[int]) -> list[int]:
        inner = span[1:-1]
        if self.img_pad_id in inner:
            inner = inner[: inner.index(self.img_pad_id)]
        return [self.img_start_id, *self.encoding.encode(bytes(inner).decode("utf-8")), self.img_end_id]


def replace_closed_spans(items: list, start, end, replace: Callable[[list], list]) -> list:
    """Replace each start..end span (inclusive) with replace(span), scanning item by item in Python."""
    out: list = []
    pos = 0
    while True:
        first = next((i for i in range(pos, len(items)) if items[i] == start), -1)
        if first < 0:
            break
        last = next((i for i in range(first, len(items)) if items[i] == end), -1)
        if last < 0:
            raise ValueError("Unclosed image token")
        out.extend(items[pos:first])
        out.extend(replace(items[first : last + 1]))
        pos = last + 1
    out.extend(items[pos:])
    return out


def throughput(timing: Timing, megabytes: float, tokens: int) -> dict:
    return {**timing.as_dict(), "mb_per_s": megabytes / timing.median, "tokens_per_s": tokens / timing.median}


def run(megabytes: float, repeats: int) -> dict:
    other_load = OtherLoad()
    tok = QwenVLTokenizer()
    original = OriginalAlgorithm(tok)
    text = mixed_text(megabytes)
    size_mb = len(text.encode("utf-8")) / MB

    ids = tok.encode(text)
    if original.encode(text) != ids:
        raise AssertionError("the original algorithm and QwenVLTokenizer.encode disagree on the text")
    expected_text = unicodedata.normalize("NFC", text)
    if tok.decode(ids) != expected_text or original.decode(ids) != expected_text:
        raise AssertionError("decode(encode(text)) does not give the text back")

    encodes = {
        "qwenvl": time_call(lambda: tok.encode(text), repeats=repeats),
        "original_algorithm": time_call(lambda: original.encode(text), repeats=repeats),
        "tiktoken_only": time_call(
            lambda: tok.tokenizer.encode(text, allowed_special="all"), repeats=repeats
        ),
    }
    decodes = {
        "qwenvl": time_call(lambda: tok.decode(ids), repeats=repeats),
        "original_algorithm": time_call(lambda: original.decode(ids), repeats=repeats),
        "tiktoken_only": time_call(lambda: tok.tokenizer.decode_bytes(ids), repeats=repeats),
    }
    return {
        "text": {
            "megabytes": size_mb,
            "characters": len(text),
            "tokens": len(ids),
            "image_spans": text.count("<img>"),
            "grounding_boxes": text.count("<box>"),
        },
        "encode": {name: throughput(t, size_mb, len(ids)) for name, t in encodes.items()},
        "decode": {name: throughput(t, size_mb, len(ids)) for name, t in decodes.items()},
        "speedup_vs_original_algorithm": {
            "encode": encodes["original_algorithm"].median / encodes["qwenvl"].median,
            "decode": decodes["original_algorithm"].median / decodes["qwenvl"].median,
        },
        "other_processes_cores": other_load.cores(),
    }


def report(results: dict) -> str:
    text = results["text"]
    rows = []
    for direction in ("encode", "decode"):
        for name, figures in results[direction].items():
            rows.append(
                [direction, name, figures["median_s"] * 1e3, figures["mb_per_s"], figures["tokens_per_s"]]
            )
    speedup = results["speedup_vs_original_algorithm"]
    return "\n".join(
        [
            f"Text: {text['megabytes']:.2f} MB, {text['characters']:,} characters, "
            f"{text['tokens']:,} tokens, {text['image_spans']} image spans, {text['grounding_boxes']} boxes",
            "",
            markdown_table(["direction", "implementation", "median ms", "MB/s", "tokens/s"], rows),
            "",
            "speedup_vs_original_algorithm: "
            f"encode {speedup['encode']:.2f}x, decode {speedup['decode']:.2f}x",
            f"other processes' load during the run: {results['other_processes_cores']:.2f} cores",
        ]
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=1.0, help="size of the generated text")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per figure (after one warm-up)")
    add_json_option(parser, "tokenizer_speed.json")
    args = parser.parse_args(argv)
    results = run(args.megabytes, args.repeats)
    print(report(results))
    path = json_path(args, "tokenizer_speed.json")
    save_record(path, "tokenizer_speed", results)
    print(f"\nsaved {path}")


if __name__ == "__main__":
    main()
