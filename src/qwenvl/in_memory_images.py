"""Pictures held in memory (encoded bytes, a ``data:`` URL, a PIL image) and the prompt text that
names them.

An image span holds at most 256 bytes of reference, so such a picture is named in its
``<img>...</img>`` span by a short digest of its content (`image_name`) and travels beside the
text: `tokenizer.from_list_format` returns a `TextWithImages`, a ``str`` whose ``images`` map each
name to its picture. `model.chat` reads them from the query and every history turn,
``tokenizer(text)`` puts them under ``images`` for ``model.generate(**inputs)``, and `find_image`
turns a name back into its picture. Paths and URLs stay in the text, as in the original.

This module imports nothing heavy: the tokenizer uses it.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from typing import Any

# The names image_name gives: a 12-byte digest, then the decoded size for a picture loaded from bytes.
IMAGE_NAME = re.compile(r"image-[0-9a-f]{24}(-[0-9]+x[0-9]+)?")


class TextWithImages(str):
    """Prompt text with the in-memory pictures its ``<img>`` spans name: ``images`` maps each name
    to its picture (encoded bytes or a PIL image).

    ``+`` keeps the pictures of both sides; any other string operation gives a plain ``str``,
    whose names then no longer find their pictures (`find_image` says so).
    """

    images: dict[str, Any]

    def __new__(cls, text: str, images: Mapping[str, Any]) -> TextWithImages:
        self = super().__new__(cls, text)
        self.images = dict(images)
        return self

    def __add__(self, other: object) -> TextWithImages:
        if not isinstance(other, str):
            return NotImplemented
        return TextWithImages(str.__add__(self, other), carried_images(self, other))

    def __radd__(self, other: object) -> TextWithImages:
        # called before str.__add__ for `text + self`, as self's type subclasses the left operand's
        if not isinstance(other, str):
            return NotImplemented
        return TextWithImages(str.__add__(other, self), carried_images(other, self))

    def __reduce__(self):
        return TextWithImages, (str(self), self.images)


def carried_images(*texts: object) -> dict[str, Any]:
    """The pictures that ``texts`` carry, by name: each a str (a `TextWithImages` carries some) or a
    list or tuple of them, such as a conversation's history; other values carry none."""
    images: dict[str, Any] = {}
    for text in texts:
        if isinstance(text, TextWithImages):
            images.update(text.images)
        elif isinstance(text, (list, tuple)):
            images.update(carried_images(*text))
    return images


def held_in_memory(image: object) -> bool:
    """Whether a list-format image is a picture itself rather than a path or URL that names one: a
    ``data:`` URL holds its picture, so it is one too."""
    if isinstance(image, os.PathLike):
        return False
    return not isinstance(image, str) or image[:5].lower() == "data:"


def add_image(images: dict[str, Any], image: object) -> str:
    """Put ``image`` (a data URL, bytes or a PIL image) into ``images`` under its name; return the name.

    A data URL is kept as its decoded bytes; a bad one, or a value of another type, raises
    `images.ImageError` naming it.
    """
    from .images import ImagePolicy, read_image

    picture = read_image(image, ImagePolicy.permissive())
    name = image_name(picture)
    images.setdefault(name, picture)
    return name


def image_name(image: Any) -> str:
    """The name a picture in memory gets in its span: a digest of its encoded bytes (for a picture
    that `images.load_image` decoded, those it was decoded from: `images.image_digest`), else of
    its pixels. The same picture gets the same tokens, so a later turn reuses its keys and values
    (engine.py, PrefixCache); another picture behind the same words gets other tokens, so it
    never reuses a stranger's."""
    if isinstance(image, (bytes, bytearray)):
        return f"image-{hashlib.blake2b(image, digest_size=12).hexdigest()}"
    from .images import image_digest

    encoded = image_digest(image)
    if encoded is not None:
        return f"image-{encoded}"
    digest = hashlib.blake2b(f"{image.mode} {image.size}".encode(), digest_size=12)
    digest.update(image.tobytes())
    return f"image-{digest.hexdigest()}"


def find_image(reference: str, images: Mapping[str, Any] | None) -> Any:
    """What `images.load_image` reads for a span's reference: the picture given under that name,
    else the reference itself (a path or URL). A picture's name with no picture given under it
    raises `images.ImageError` naming it."""
    if images and reference in images:
        return images[reference]
    if IMAGE_NAME.fullmatch(reference):
        from .images import ImageError

        raise ImageError(
            reference,
            "no picture of that name was given with the prompt. A picture in memory travels with "
            "the text tokenizer.from_list_format returns (and with the history model.chat returns): "
            "pass that text itself, not a copy built from its characters, or give its .images as "
            "images= to generate",
        )
    return reference
