"""A reply as the chat shows it: each ``<ref>`` phrase a coloured label, the coordinates left out.

The drawn picture already shows the boxes, so ``<box>``/``<quad>`` spans and stray tags are
dropped. A label has the colour of its boxes on the picture (`grounding.assign_colors`) and black
or white text, whichever reads better on it. The chat renders Markdown with HTML and the model's
text is untrusted: ordinary text is HTML-escaped (its Markdown still renders), and a phrase becomes
character references for every ASCII punctuation mark, so neither HTML nor Markdown in it acts.
While a reply streams, an unfinished tag at its end is held back and an unfinished box is hidden,
so no half-received markup ever shows.
"""

from __future__ import annotations

import html
import re
import string

from ..chat_format import GROUNDING_TAGS
from ..grounding import PALETTE, RGB, assign_colors, label_text_color, parse_boxes

REF_CLASS = "qwenvl-ref"
UNBOXED_COLOR: RGB = (229, 231, 235)  # a phrase no box follows has no colour on the picture

_TAG = r"</?(?:ref|box|quad)>"
_UNTIL_TAG = rf"(?:(?!{_TAG}).)*"  # up to the next grounding tag or the end
_MARKUP = re.compile(
    rf"<ref>(?P<phrase>{_UNTIL_TAG})(?:</ref>)?"  # a phrase, maybe still arriving
    rf"|<(?:box|quad)>{_UNTIL_TAG}(?:</(?:box|quad)>)?"  # coordinates, maybe still arriving
    rf"|{_TAG}",  # a stray closing tag
    re.DOTALL,
)
# The end of a streaming reply that may still grow into a tag: "<", "</r", "<bo", ...
_PARTIAL_TAG = re.compile(
    "(?:" + "|".join(re.escape(tag[:k]) for tag in GROUNDING_TAGS for k in range(1, len(tag))) + r")\Z"
)
# What may follow a phrase whose box is still to come: spaces, then maybe the box's first part.
_AWAITING_BOX = re.compile(r"\s*(?:<(?:box|quad)>[^<]*)?\Z")


def reply_html(text: str, *, final: bool) -> str:
    """``text``, a whole reply (``final``) or one still streaming, as safe HTML for the chat."""
    if not final:
        text = _PARTIAL_TAG.sub("", text)
    colors = assign_colors(parse_boxes(text))
    pieces = []
    position = 0
    for match in _MARKUP.finditer(text):
        pieces.append(html.escape(text[position : match.start()], quote=False))
        position = match.end()
        phrase = match.group("phrase")
        if phrase is None or not phrase.strip():  # coordinates, a stray tag or an empty <ref></ref>
            continue
        color = colors.get(phrase)
        if color is None:
            # The latest phrase of a streaming reply takes the colour its first box will get.
            awaiting = not final and _AWAITING_BOX.match(text, position) is not None
            color = PALETTE[len(colors) % len(PALETTE)] if awaiting else UNBOXED_COLOR
        pieces.append(ref_label(phrase, color))
    pieces.append(html.escape(text[position:], quote=False))
    return "".join(pieces).strip()


def ref_label(phrase: str, color: RGB) -> str:
    """A phrase as an inline label: ``color`` behind text in its `label_text_color`; spaces collapsed."""
    words = " ".join(phrase.split())
    text = "".join(f"&#{ord(char)};" if char in string.punctuation else char for char in words)
    style = (
        f"background-color:{css_color(color)};color:{css_color(label_text_color(color))};"
        "border-radius:0.3em;padding:0 0.3em"
    )
    return f'<span class="{REF_CLASS}" style="{style}">{text}</span>'


def css_color(color: RGB) -> str:
    return "#{:02x}{:02x}{:02x}".format(*color)
