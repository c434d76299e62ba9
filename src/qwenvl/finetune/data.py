"""Fine-tuning data: Qwen-VL's conversation JSON -> token ids, assistant-only labels, pixels, batches.

A sample is ``{"id": ..., "conversations": [{"from": "user" | "assistant", "value": text}, ...]}``;
turns alternate, starting with the user. Text may hold ``<img>path</img>`` tags (trusted data: the
tags are live, as in `chat_format.make_context`); relative paths are resolved against the folder
of the data file. A sequence is built with make_context's token-level construction, so training
sees exactly the ids that inference prompts have:

    <|im_start|>system\\n{system}<|im_end|>
    \\n<|im_start|>user\\n{value}<|im_end|>
    \\n<|im_start|>assistant\\n{value}<|im_end|>   ... (a "\\n" between turns, none at the end)

Labels are -100 everywhere except an assistant reply and the `<|im_end|>` that closes it.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch.utils.data import Dataset

from ..chat_format import DEFAULT_SYSTEM, encode_content
from ..images import ImageError, ImagePolicy, load_image, preprocess
from ..tokenizer import QwenVLTokenizer

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # the label of a position the loss skips (cross_entropy's ignore_index)
ROLES = ("user", "assistant")
# "C:\\x.png" parses as scheme "c": a URL scheme has at least two characters
_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")


class DataError(ValueError):
    """Malformed training data; the message names the sample (its id, or its index without one)."""


@dataclass
class Example:
    """One tokenized training sequence; `images` holds one resolved reference per image span, in order."""

    id: str
    input_ids: list[int]
    labels: list[int]
    images: list[str] = field(default_factory=list)


# -- reading and checking ----------------------------------------------------------------------------


def load_items(path: str | os.PathLike) -> list[dict]:
    """The samples of a JSON list file (or of a JSON-lines file, one sample a line)."""
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".jsonl"):
        return _json_lines(path, text)
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(items, list):
        raise DataError(f"{path} must hold a JSON list of samples, not a {type(items).__name__}")
    return items


def _json_lines(path: str, text: str) -> list[object]:
    """One sample a line; blank lines are skipped, but counted in the line number of an error."""
    items = []
    # lines end at "\n" alone: str.splitlines would also split at U+2028 and other characters
    # that JSON strings may hold unescaped
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            items.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {number}, column {e.colno}: not valid JSON: {e.msg}") from e
    return items


def parse_item(item: object, index: int) -> tuple[str, list[tuple[str, str]]]:
    """(id, [(role, value), ...]) of one sample, or DataError naming the sample and the problem."""
    if not isinstance(item, dict):
        raise DataError(f"sample #{index}: expected an object with 'id' and 'conversations'")
    if "id" not in item:
        raise DataError(f"sample #{index} has no 'id'")
    name = f"sample {str(item['id'])!r}"
    conversation = item.get("conversations")
    if not isinstance(conversation, list) or not conversation:
        raise DataError(f"{name}: 'conversations' must be a non-empty list of turns")
    turns = []
    for k, turn in enumerate(conversation):
        if not isinstance(turn, dict):
            raise DataError(f"{name}, turn {k}: expected an object with 'from' and 'value'")
        for key in ("from", "value"):
            if key not in turn:
                raise DataError(f"{name}, turn {k}: missing key {key!r}")
        role, value = turn["from"], turn["value"]
        if role not in ROLES:
            raise DataError(f"{name}, turn {k}: role {role!r} is not 'user' or 'assistant'")
        if role != ROLES[k % 2]:
            raise DataError(f"{name}, turn {k}: expected {ROLES[k % 2]!r} (turns alternate, user first)")
        if not isinstance(value, str):
            raise DataError(f"{name}, turn {k}: 'value' must be a string, got {type(value).__name__}")
        turns.append((role, value))
    if len(turns) < 2:
        raise DataError(f"{name} has no assistant turn to learn from")
    return str(item["id"]), turns


def resolve_image(reference: str, base_dir: str | os.PathLike) -> str:
    """A reference as load_image takes it: URLs and absolute paths as they are, others under base_dir."""
    if _URL_SCHEME.match(reference) or os.path.isabs(reference):
        return reference
    return os.path.join(base_dir, reference)


# -- token ids and labels ----------------------------------------------------------------------------


def _mask_image_spans(tokenizer: QwenVLTokenizer, ids: list[int]) -> list[int]:
    """Labels for content ids: the ids themselves, -100 on image spans (their positions hold features)."""
    labels, inside = [], False
    for token in ids:
        inside = inside or token == tokenizer.img_start_id
        labels.append(IGNORE_INDEX if inside else token)
        inside = inside and token != tokenizer.img_end_id
    return labels


def encode_conversation(
    tokenizer: QwenVLTokenizer, turns: Sequence[tuple[str, str]], system: str = DEFAULT_SYSTEM
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a conversation, built like `make_context` (role, "\\n", content)."""
    nl = tokenizer.encode("\n")

    def header(role: str) -> list[int]:
        return [tokenizer.im_start_id, *tokenizer.encode_chat(role), *nl]

    ids = header("system") + encode_content(tokenizer, system)[1] + [tokenizer.im_end_id]
    labels = [IGNORE_INDEX] * len(ids)
    for role, value in turns:
        content = encode_content(tokenizer, value)[1]
        prefix = nl + header(role)
        ids += prefix + content + [tokenizer.im_end_id]
        if role == "assistant":  # the reply and the <|im_end|> that ends it: the model must learn to stop
            labels += [IGNORE_INDEX] * len(prefix) + _mask_image_spans(tokenizer, content)
            labels.append(tokenizer.im_end_id)
        else:
            labels += [IGNORE_INDEX] * (len(prefix) + len(content) + 1)
    return ids, labels


def truncate(
    tokenizer: QwenVLTokenizer, ids: list[int], labels: list[int], max_length: int
) -> tuple[list[int], list[int]]:
    """The first `max_length` positions, cut earlier when the cut would fall inside an image span."""
    if len(ids) <= max_length:
        return ids, labels
    cut = max_length
    head = ids[:cut]
    if tokenizer.img_start_id in head:
        last_start = len(head) - 1 - head[::-1].index(tokenizer.img_start_id)
        if tokenizer.img_end_id not in head[last_start:]:
            cut = last_start
    return ids[:cut], labels[:cut]


def build_example(
    tokenizer: QwenVLTokenizer,
    item: object,
    index: int,
    base_dir: str | os.PathLike = ".",
    max_length: int = 2048,
    system: str = DEFAULT_SYSTEM,
) -> Example:
    """Check, tokenize and truncate one sample; image references are resolved against `base_dir`."""
    sample_id, turns = parse_item(item, index)
    try:
        ids, labels = encode_conversation(tokenizer, turns, system)
    except ValueError as e:  # an image reference over 256 bytes, an unclosed <img>
        raise DataError(f"sample {sample_id!r}: {e}") from e
    ids, labels = truncate(tokenizer, ids, labels, max_length)
    images = [resolve_image(ref, base_dir) for ref in tokenizer.image_references(ids)]
    for ref in images:
        if not _URL_SCHEME.match(ref) and not os.path.isfile(ref):
            raise DataError(f"sample {sample_id!r}: image file {ref!r} not found")
    return Example(sample_id, ids, labels, images)


# -- dataset and batches -----------------------------------------------------------------------------


class ConversationDataset(Dataset):
    """Tokenized samples (checked up front); images are read and preprocessed when a sample is taken.

    Samples left without a supervised token after truncation are skipped with a warning.
    """

    def __init__(
        self,
        items: Sequence[object],
        tokenizer: QwenVLTokenizer,
        base_dir: str | os.PathLike = ".",
        max_length: int = 2048,
        image_size: int = 448,
        system: str = DEFAULT_SYSTEM,
        image_policy: ImagePolicy | None = None,
    ):
        self.image_size = image_size
        self.image_policy = image_policy
        self.examples: list[Example] = []
        for index, item in enumerate(items):
            example = build_example(tokenizer, item, index, base_dir, max_length, system)
            # position 0 is never a target: the loss compares logits at t with labels at t + 1
            if all(label == IGNORE_INDEX for label in example.labels[1:]):
                logger.warning(
                    "sample %r has no assistant token within %d tokens: skipped", example.id, max_length
                )
                continue
            self.examples.append(example)
        if not self.examples:
            raise DataError("no sample has an assistant reply within max_length tokens")

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> tuple[Example, torch.Tensor | None]:
        """The example and its pixels [N, 3, S, S] (None without images)."""
        example = self.examples[index]
        if not example.images:
            return example, None
        try:
            images = [load_image(ref, self.image_policy) for ref in example.images]
        except ImageError as e:
            raise DataError(f"sample {example.id!r}: {e}") from e
        return example, preprocess(images, self.image_size)


@dataclass
class Batch:
    """Right-padded rows; `pixel_values` holds the images of all rows in order of their spans."""

    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L], 1 on real tokens
    labels: torch.Tensor  # [B, L], -100 on unsupervised positions and pads
    pixel_values: torch.Tensor | None  # [N, 3, S, S]
    ids: list[str]

    @property
    def lengths(self) -> list[int]:
        return self.attention_mask.sum(-1).tolist()

    def to(self, device: torch.device | str) -> Batch:
        pixels = self.pixel_values.to(device) if self.pixel_values is not None else None
        move = [t.to(device) for t in (self.input_ids, self.attention_mask, self.labels)]
        return Batch(*move, pixels, self.ids)

    def model_inputs(self) -> dict[str, torch.Tensor | None]:
        """Keyword arguments for `QwenVLForCausalLM.forward`."""
        return dict(
            input_ids=self.input_ids,
            attention_mask=self.attention_mask,
            labels=self.labels,
            pixel_values=self.pixel_values,
        )


def collate(samples: Sequence[tuple[Example, torch.Tensor | None]], pad_id: int = 151643) -> Batch:
    """Pad examples on the right (pad id `<|endoftext|>`, label -100) and stack their images."""
    width = max(len(example.input_ids) for example, _ in samples)
    shape = (len(samples), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    for row, (example, _) in enumerate(samples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention_mask[row, :n] = 1
    pixels = [p for _, p in samples if p is not None]
    pixel_values = torch.cat(pixels) if pixels else None
    return Batch(input_ids, attention_mask, labels, pixel_values, [example.id for example, _ in samples])
