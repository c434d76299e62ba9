"""qwenvl's version: the installed package's metadata, else the source tree's pyproject.toml."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

UNKNOWN = "0+unknown"
_PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"  # src/qwenvl/ -> the tree's root


def package_version() -> str:
    try:
        return metadata.version("qwenvl")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return source_tree_version(_PYPROJECT)


def source_tree_version(pyproject: Path) -> str:
    """The `version` of the [project] table of qwenvl's pyproject.toml; UNKNOWN without one.

    A regular expression, not tomllib: Python 3.10 has no TOML reader, and the table is ours.
    """
    try:
        text = pyproject.read_text(encoding="utf-8")
    except OSError:
        return UNKNOWN
    project = re.search(r"^\[project\]\n(.*?)(?=^\[|\Z)", text, re.MULTILINE | re.DOTALL)
    if project is None or not re.search(r'^name\s*=\s*"qwenvl"\s*$', project.group(1), re.MULTILINE):
        return UNKNOWN
    version = re.search(r'^version\s*=\s*"([^"]+)"\s*$', project.group(1), re.MULTILINE)
    return version.group(1) if version else UNKNOWN
