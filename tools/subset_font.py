"""Build the CJK label font shipped in ``src/qwenvl/assets/fonts/``.

The source is WenQuanYi Micro Hei (Debian package ``fonts-wqy-microhei``, dual-licensed
Apache-2.0 / GPLv3 with font exception; we redistribute it under Apache-2.0). The full font
is a 5 MB collection; box labels only need Latin text, punctuation and common Chinese, so we
keep ASCII, Latin-1, General Punctuation, CJK Symbols and Punctuation, full-width forms and
every CJK ideograph that GB2312 can encode.

One-time step, run from the repository root (fontTools is not a runtime dependency):

    apt-get install fonts-wqy-microhei
    pip install fonttools
    python tools/subset_font.py [/usr/share/fonts/truetype/wqy/wqy-microhei.ttc]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fontTools import subset
from fontTools.ttLib import TTFont

DEFAULT_SOURCE = "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc"
DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "src/qwenvl/assets/fonts/wqy-microhei-gb2312.ttf"

# Unicode blocks kept whole: (first, last) inclusive.
KEPT_RANGES = [
    (0x0020, 0x007E),  # ASCII printable
    (0x00A0, 0x00FF),  # Latin-1 supplement
    (0x2000, 0x206F),  # General Punctuation
    (0x3000, 0x303F),  # CJK Symbols and Punctuation
    (0xFF00, 0xFFEF),  # Halfwidth and Fullwidth Forms
]


def gb2312_ideographs() -> list[int]:
    """Code points of the CJK Unified Ideographs that GB2312 can encode (6,763 characters)."""
    kept = []
    for cp in range(0x4E00, 0xA000):
        try:
            chr(cp).encode("gb2312")
        except UnicodeEncodeError:
            continue
        kept.append(cp)
    return kept


def wanted_codepoints() -> list[int]:
    codepoints = [cp for first, last in KEPT_RANGES for cp in range(first, last + 1)]
    return codepoints + gb2312_ideographs()


def subset_font(source: str, output: Path) -> None:
    # Face 0 of the collection is the proportional "WenQuanYi Micro Hei" (face 1 is Mono).
    font = TTFont(source, fontNumber=0)
    options = subset.Options()
    options.name_IDs = ["*"]  # keep the copyright and license records
    options.notdef_outline = True  # missing characters show as a box, not as nothing
    subsetter = subset.Subsetter(options=options)
    subsetter.populate(unicodes=wanted_codepoints())
    subsetter.subset(font)
    output.parent.mkdir(parents=True, exist_ok=True)
    font.save(str(output))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("source", nargs="?", default=DEFAULT_SOURCE)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args()
    subset_font(args.source, args.output)
    print(f"wrote {args.output} ({args.output.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
