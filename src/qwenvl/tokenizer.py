"""The Qwen-VL tokenizer: tiktoken BPE, special tokens, image spans and the list format (SPEC section 2)."""

from __future__ import annotations

import base64
import json
import os
import unicodedata
from collections.abc import Collection, Iterable, Sequence
from importlib import resources
from typing import Any

import tiktoken

from .in_memory_images import TextWithImages, add_image, carried_images, find_image, held_in_memory

PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
ENDOFTEXT = "<|endoftext|>"
IMSTART = "<|im_start|>"
IMEND = "<|im_end|>"
EXTRAS = tuple(f"<|extra_{i}|>" for i in range(205))
IMAGE_ST = ("<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<img>", "</img>", "<imgpad>")
SPECIAL_TOKENS = (ENDOFTEXT, IMSTART, IMEND, *EXTRAS, *IMAGE_ST)
IMAGE_SPAN = 256  # ids between <img> and </img>: the reference's bytes, then <imgpad>
VOCAB_FILE = "qwen.tiktoken"
# The class name the official tokenizer_config.json asks for.
TOKENIZER_CLASS = "QWenTokenizer"

# (start, end) tag pairs of the list format, in the order the original tests them.
_LIST_TAGS = (("<img>", "</img>", "image"), ("<ref>", "</ref>", "ref"), ("<box>", "</box>", "box"))
_LIST_TAGS += (("<quad>", "</quad>", "quad"),)


def load_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    with open(path, "rb") as f:
        return {
            base64.b64decode(token): int(rank) for token, rank in (line.split() for line in f if line.strip())
        }


def packaged_vocab_file() -> str:
    return str(resources.files("qwenvl") / "assets" / VOCAB_FILE)


def _find(ids: Sequence[int], value: int, start: int) -> int:
    try:
        return ids.index(value, start)  # a C-level scan: texts run to hundreds of thousands of ids
    except ValueError:
        return -1


def split_closed_tags(ids: list[int], pairs: dict[int, int]) -> list[tuple[bool, list[int]]]:
    """Split ids into (is_tagged, ids) runs; a tagged run goes from a start id to its end id inclusive.

    An opened tag without its closing id is an error, as in the original.
    """
    runs: list[tuple[bool, list[int]]] = []
    pos = 0
    n = len(ids)
    upcoming = {tag: _find(ids, tag, 0) for tag in pairs}  # each tag's next position, -1 when none
    while pos < n:
        for tag, at in upcoming.items():
            if 0 <= at < pos:
                upcoming[tag] = _find(ids, tag, pos)
        starts = [at for at in upcoming.values() if at >= 0]
        if not starts:
            break
        start = min(starts)
        end = _find(ids, pairs[ids[start]], start)
        if end < 0:
            raise ValueError("Unclosed image token")
        if start > pos:
            runs.append((False, ids[pos:start]))
        runs.append((True, ids[start : end + 1]))
        pos = end + 1
    if pos < n:
        runs.append((False, ids[pos:]))
    return runs


def image_references(ids: list[int], img_start_id: int) -> list[str]:
    """The references (paths, URLs) that the image spans of `ids` hold, in order.

    A span is `<img>`, the reference's bytes as ids 0..255, `<imgpad>`s, `</img>` (the two
    ids after `<img>`). Raises ValueError for a span that holds anything else.
    """
    end_id, pad_id = img_start_id + 1, img_start_id + 2
    references = []
    pos = _find(ids, img_start_id, 0)
    while pos >= 0:
        inner = []
        for t in ids[pos + 1 : pos + 1 + IMAGE_SPAN]:
            if t in (pad_id, end_id):
                break
            if not 0 <= t <= 255:
                raise ValueError(f"the image span at position {pos} does not hold a reference")
            inner.append(t)
        try:
            references.append(bytes(inner).decode("utf-8"))
        except UnicodeDecodeError:
            raise ValueError(f"the image span at position {pos} does not hold UTF-8 text") from None
        pos = _find(ids, img_start_id, pos + 1)
    return references


class QwenVLTokenizer:
    """Byte-for-byte the original QWenTokenizer, without transformers' slow-tokenizer machinery."""

    vocab_files_names = {"vocab_file": VOCAB_FILE}
    model_input_names = ["input_ids", "attention_mask"]
    padding_side = "right"

    def __init__(self, vocab_file: str | os.PathLike | None = None, errors: str = "replace", **kwargs: Any):
        self.vocab_file = os.fspath(vocab_file) if vocab_file else packaged_vocab_file()
        self.errors = errors
        self.name_or_path = kwargs.get("name_or_path", "")
        self.model_max_length = int(kwargs.get("model_max_length", 8192))
        self.mergeable_ranks = load_tiktoken_ranks(self.vocab_file)
        self.special_tokens = {tok: len(self.mergeable_ranks) + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self.IMAGE_ST = IMAGE_ST
        self._build_encoding()

    def _build_encoding(self) -> None:
        self.tokenizer = tiktoken.Encoding(
            "Qwen", pat_str=PAT_STR, mergeable_ranks=self.mergeable_ranks, special_tokens=self.special_tokens
        )
        st = self.special_tokens
        self.eod_id = st[ENDOFTEXT]
        self.im_start_id, self.im_end_id = st[IMSTART], st[IMEND]
        self.ref_start_id, self.ref_end_id = st["<ref>"], st["</ref>"]
        self.box_start_id, self.box_end_id = st["<box>"], st["</box>"]
        self.quad_start_id, self.quad_end_id = st["<quad>"], st["</quad>"]
        self.img_start_id, self.img_end_id, self.img_pad_id = st["<img>"], st["</img>"], st["<imgpad>"]
        self._grounding_ids = frozenset(
            (self.ref_start_id, self.ref_end_id, self.box_start_id, self.box_end_id, self.quad_start_id)
            + (self.quad_end_id,)
        )
        self._decoder = {v: k for k, v in self.mergeable_ranks.items()}
        self._decoder.update({v: k for k, v in st.items()})

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["tokenizer"]  # a tiktoken Encoding does not pickle; rebuilt on load
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._build_encoding()

    # -- loading and saving -------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
        local_files_only: bool = False,
        **kwargs: Any,
    ) -> QwenVLTokenizer:
        """Read a model folder or hub id; extra keyword arguments from AutoTokenizer are ignored."""
        from .hub import TOKENIZER_FILE_PATTERNS, resolve_model_folder

        folder = resolve_model_folder(
            name_or_path,
            revision=revision,
            cache_dir=cache_dir,
            token=token,
            local_files_only=local_files_only,
            patterns=TOKENIZER_FILE_PATTERNS,
        )
        settings: dict[str, Any] = {}
        config_path = os.path.join(folder, "tokenizer_config.json")
        if os.path.exists(config_path):
            with open(config_path, encoding="utf-8") as f:
                settings = {k: v for k, v in json.load(f).items() if k in ("errors", "model_max_length")}
        if "errors" in kwargs:
            settings["errors"] = kwargs["errors"]
        vocab = os.path.join(folder, VOCAB_FILE)
        # Every Qwen-VL checkpoint uses the same vocabulary; the package ships a copy for folders without it.
        return cls(vocab if os.path.exists(vocab) else None, name_or_path=os.fspath(name_or_path), **settings)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> tuple[str, ...]:
        os.makedirs(save_directory, exist_ok=True)
        vocab_path = self.save_vocabulary(save_directory)[0]
        config_path = os.path.join(save_directory, "tokenizer_config.json")
        config = {"tokenizer_class": TOKENIZER_CLASS, "model_max_length": self.model_max_length}
        with open(config_path, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
        return config_path, vocab_path

    def save_vocabulary(self, save_directory: str | os.PathLike, **kwargs: Any) -> tuple[str]:
        path = os.path.join(save_directory, VOCAB_FILE)
        with open(path, "w", encoding="utf-8") as f:
            for token, rank in self.mergeable_ranks.items():
                f.write(f"{base64.b64encode(token).decode()} {rank}\n")
        return (path,)

    # -- vocabulary ---------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.tokenizer.n_vocab

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.n_vocab

    def get_vocab(self) -> dict[bytes | str, int]:
        return {**self.mergeable_ranks, **self.special_tokens}

    @property
    def all_special_ids(self) -> list[int]:
        return list(self.special_tokens.values())

    eos_token = pad_token = ENDOFTEXT

    @property
    def eos_token_id(self) -> int:
        return self.eod_id

    @property
    def pad_token_id(self) -> int:
        return self.eod_id

    def convert_tokens_to_ids(
        self, tokens: bytes | str | Iterable[bytes | str]
    ) -> int | None | list[int | None]:
        if isinstance(tokens, (str, bytes)):
            return (
                self.special_tokens.get(tokens)
                if isinstance(tokens, str)
                else self.mergeable_ranks.get(tokens)
            )
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | Iterable[int], skip_special_tokens: bool = False):
        if isinstance(ids, int):
            return self._decoder[ids]
        return [self._decoder[i] for i in ids if not (skip_special_tokens and i >= self.eod_id)]

    def convert_tokens_to_string(self, tokens: Iterable[bytes | str]) -> str:
        data = b"".join(t.encode("utf-8") if isinstance(t, str) else t for t in tokens)
        return data.decode("utf-8", errors=self.errors)

    # -- encoding -----------------------------------------------------------------------------------

    def encode(
        self,
        text: str,
        allowed_special: Collection[str] | str = "all",
        disallowed_special: Collection[str] | str = (),
        **kwargs: Any,
    ) -> list[int]:
        """Ids of `text`; every special surface form is allowed unless `allowed_special` narrows it.

        The text of each `<img>...</img>` span becomes its 256-id image span.
        """
        text = unicodedata.normalize("NFC", text)
        ids = self.tokenizer.encode(
            text, allowed_special=allowed_special, disallowed_special=disallowed_special
        )
        if self.img_start_id in ids:
            ids = self._expand_image_spans(ids)
        return ids

    def encode_chat(self, text: str) -> list[int]:
        """Ids of conversation content: only the nine image/ref/box/quad tags are special."""
        return self.encode(text, allowed_special=set(IMAGE_ST))

    def tokenize(self, text: str, allowed_special: Collection[str] | str = "all", **kwargs: Any):
        return self.convert_ids_to_tokens(self.encode(text, allowed_special=allowed_special, **kwargs))

    def _expand_image_spans(self, ids: list[int]) -> list[int]:
        out: list[int] = []
        for tagged, run in split_closed_tags(ids, {self.img_start_id: self.img_end_id}):
            if not tagged:
                out.extend(run)
                continue
            inner = run[1:-1]
            if any(i >= self.eod_id for i in inner):
                raise ValueError(
                    "an image reference between <img> and </img> must not contain special tokens"
                )
            out += self.image_span_ids(self.tokenizer.decode_bytes(inner))
        return out

    def image_references(self, ids: list[int]) -> list[str]:
        """The references in the image spans of `ids`, in order (see the module function)."""
        return image_references(ids, self.img_start_id)

    def image_span_ids(self, reference: str | bytes) -> list[int]:
        """The 258 ids of an image span: `<img>`, the reference's bytes as ids, `<imgpad>`s, `</img>`."""
        data = reference.encode("utf-8") if isinstance(reference, str) else reference
        if len(data) > IMAGE_SPAN:
            raise ValueError(
                f"The content in <img>..</img> is too long: {len(data)} bytes, at most {IMAGE_SPAN}; "
                "give a picture in memory (bytes, a data: URL, a PIL image) through from_list_format"
            )
        return [self.img_start_id, *data, *[self.img_pad_id] * (IMAGE_SPAN - len(data)), self.img_end_id]

    def __call__(
        self, text: str | list[str], return_tensors: str | None = None, padding: bool | str = False, **kw
    ):
        """`tokenizer(text, return_tensors="pt")` as with a transformers tokenizer (right padding)."""
        from transformers import BatchEncoding

        batch = [text] if isinstance(text, str) else list(text)
        rows = [self.encode(t, **kw) for t in batch]
        if padding or (return_tensors and len({len(r) for r in rows}) > 1):
            width = max(len(r) for r in rows)
            masks = [[1] * len(r) + [0] * (width - len(r)) for r in rows]
            rows = [r + [self.pad_token_id] * (width - len(r)) for r in rows]
        else:
            masks = [[1] * len(r) for r in rows]
        data = {"input_ids": rows, "attention_mask": masks}
        if isinstance(text, str):
            data = {k: v[0] for k, v in data.items()}
            if return_tensors:
                data = {k: [v] for k, v in data.items()}
        encoding = BatchEncoding(data, tensor_type=return_tensors)
        images = carried_images(*batch)
        if images:  # the in-memory pictures the spans name, for model.generate(**encoding)
            encoding["images"] = images
        return encoding

    # -- decoding -----------------------------------------------------------------------------------

    def decode(
        self,
        token_ids: int | Iterable[int],
        skip_special_tokens: bool = False,
        errors: str | None = None,
        keep_image_special: bool = False,
        **kwargs: Any,
    ) -> str:
        """Text of `token_ids`; an image span turns back into `<img>reference</img>`."""
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        elif hasattr(token_ids, "tolist"):
            token_ids = token_ids.tolist()
        ids = list(token_ids)
        keep = self._grounding_ids if keep_image_special else frozenset()
        pieces: list[bytes] = []
        for tagged, run in self._image_runs(ids):
            if tagged:
                inner = run[1:-1]
                reference = bytes(
                    inner[: inner.index(self.img_pad_id)] if self.img_pad_id in inner else inner
                )
                pieces.append(reference if skip_special_tokens else b"<img>" + reference + b"</img>")
                continue
            if skip_special_tokens:
                run = [i for i in run if i < self.eod_id or i in keep]
            elif run and max(run) >= self.tokenizer.n_vocab:
                # the model's vocabulary is padded past the tokenizer's: such ids have no text
                run = [i for i in run if i < self.tokenizer.n_vocab]
            pieces.append(self.tokenizer.decode_bytes(run))
        return b"".join(pieces).decode("utf-8", errors=errors or self.errors)

    def _image_runs(self, ids: list[int]) -> list[tuple[bool, list[int]]]:
        """Like split_closed_tags, but a malformed span (unclosed, non-byte ids) decodes as plain ids."""
        if self.img_start_id not in ids:
            return [(False, ids)]
        try:
            runs = split_closed_tags(ids, {self.img_start_id: self.img_end_id})
        except ValueError:
            return [(False, ids)]
        return [
            (tagged and all(i < 256 or i == self.img_pad_id for i in run[1:-1]), run) for tagged, run in runs
        ]

    def batch_decode(self, sequences: Iterable[Iterable[int]], **kwargs: Any) -> list[str]:
        return [self.decode(s, **kwargs) for s in sequences]

    # -- list format and grounding ------------------------------------------------------------------

    def from_list_format(self, list_format: list[dict]) -> str:
        """`[{'image': p}, {'text': t}, {'ref': r, 'box': [(x1, y1, x2, y2)]}]` -> the prompt text.

        An image given as a path or URL is named in the text, as in the original. A picture given
        in memory (a data: URL, bytes, a PIL image) is named by a digest and travels beside the
        text: the result is then a `TextWithImages`, a str whose `images` hold the pictures.
        """
        text = ""
        images: dict = {}
        num_images = 0
        for element in list_format:
            if "image" in element:
                num_images += 1
                image = element["image"]
                reference = add_image(images, image) if held_in_memory(image) else image
                text += f"Picture {num_images}: <img>{reference}</img>\n"
            elif "text" in element:
                text += element["text"]
            elif "box" in element:
                if "ref" in element:
                    text += f"<ref>{element['ref']}</ref>"
                for box in element["box"]:
                    x1, y1, x2, y2 = (int(v) for v in box[:4])  # truncated, as the original's %d
                    text += f"<box>({x1},{y1}),({x2},{y2})</box>"
            else:
                raise ValueError(f"unsupported list-format element (no image, text or box key): {element!r}")
        images.update(carried_images(text))  # a text element may carry pictures of its own
        return TextWithImages(text, images) if images else text

    def to_list_format(self, text: str) -> list[dict[str, str]]:
        """The inverse of from_list_format: `{'image'|'ref'|'box'|'quad'|'text': str}` items."""
        text = unicodedata.normalize("NFC", text)
        ids = self.tokenizer.encode(text, allowed_special=set(IMAGE_ST) | {ENDOFTEXT})
        st = self.special_tokens
        pairs = {st[start]: st[end] for start, end, _ in _LIST_TAGS}
        keys = {st[start]: key for start, _, key in _LIST_TAGS}
        items = []
        for tagged, run in split_closed_tags(ids, pairs):
            if tagged:
                items.append({keys[run[0]]: self._text_of(run[1:-1])})
            else:
                items.append({"text": self._text_of(run)})
        return items

    def _text_of(self, ids: list[int]) -> str:
        return self.tokenizer.decode_bytes(ids).decode("utf-8", errors=self.errors)

    def _fetch_latest_picture(self, response: str, history: list | None) -> str | None:
        """The image "the latest picture" means: last in the response, else in the history, newest first."""
        for query, _ in reversed([*(history or []), (response, None)]):
            for element in reversed(self.to_list_format(query)):
                if "image" in element:
                    return element["image"]
        return None

    def _fetch_all_box_with_ref(self, text: str) -> list[dict]:
        """The original's box list: a ref is attached only to the box right after it."""
        items = self.to_list_format(text)
        boxes = []
        for i, element in enumerate(items):
            if "box" not in element:
                continue
            try:
                coords = tuple(int(v) for v in element["box"].replace("(", "").replace(")", "").split(","))
            except ValueError:
                continue
            if len(coords) != 4:
                continue
            boxes.append({"box": coords})
            if i > 0 and "ref" in items[i - 1]:
                boxes[-1]["ref"] = items[i - 1]["ref"].strip()
        return boxes

    def draw_bbox_on_latest_picture(self, response: str, history: list | None = None, image_policy=None):
        """The latest picture with the response's boxes drawn and labelled (a PIL image), or None.

        None when no picture is referenced or the response has no box, as in the original. A picture
        given in memory is found among those the history's texts carry.
        """
        from .grounding import draw_boxes, parse_boxes
        from .images import load_image

        reference = self._fetch_latest_picture(response, history)
        if reference is None:
            return None
        boxes = parse_boxes(response)
        if not boxes:
            return None
        picture = find_image(reference, carried_images(response, history))
        return draw_boxes(load_image(picture, image_policy), boxes)


class QWenTokenizer(QwenVLTokenizer):
    """The name official checkpoints' tokenizer_config.json gives; AutoTokenizer finds it by this name."""
