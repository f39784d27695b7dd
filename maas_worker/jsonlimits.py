"""JSON from anyone else is bounded before it is parsed: size, then nesting depth.

Python's ``json`` parser recurses once per nesting level, so a deep enough document
raises `RecursionError`, which is not a `ValueError`. Invariant: every untrusted
document (a queue entry, a Celery message body, a job's decrypted input) passes `loads`
instead of ``json.loads``: over the depth limit it is a plain `ValueError`, like any
other malformed document.

The check costs two ``count`` calls for ordinary documents (fewer brackets
than the limit cannot nest deeper than it). A document with more brackets is
measured in C (`depth_within`): at most ``max_depth`` passes of
``bytes.replace`` over its brackets, so a hostile megabyte costs about what
parsing it would, never a Python loop per bracket (figures: docs/benchmarks.md).
"""

from __future__ import annotations

import json
import re
from typing import Any

#: Deepest nesting of a job's input (the models' own inputs nest 2 or 3 deep).
MAX_INPUT_DEPTH = 64
#: Deepest nesting of a queue entry or a Celery message body (Celery's are 3 deep).
MAX_MESSAGE_DEPTH = 16

# A string literal, escapes included (its brackets are not structure).
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
# Keep the brackets only, both kinds as one: "(" opens, ")" closes.
_BRACKETS = bytes.maketrans(b"[{]}", b"(())")
_NOT_BRACKETS = bytes(set(range(256)) - set(b"[]{}"))


def depth_within(data: str | bytes, max_depth: int) -> bool:
    """Whether the JSON text ``data`` nests at most ``max_depth`` levels deep.

    Exact for valid JSON; for invalid text it may say either, and the parser
    then refuses the text anyway. Everything runs in C: with string literals
    and all but the brackets removed, one ``replace("()", "")`` takes away
    exactly the innermost level of every group, so a text nested at most
    ``max_depth`` deep is empty after that many passes.
    """
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    if raw.count(b"[") + raw.count(b"{") <= max_depth:
        return True
    brackets = _STRING.sub(b"", raw).translate(_BRACKETS, _NOT_BRACKETS)
    for _ in range(max_depth):
        shorter = brackets.replace(b"()", b"")
        if len(shorter) == len(brackets):
            break  # nothing left to take away (or unbalanced: the parser refuses it)
        brackets = shorter
    return not brackets


def loads(data: str | bytes, *, max_depth: int, max_size: int | None = None) -> Any:
    """`json.loads` of untrusted text; `ValueError` if too large, too deep or not JSON."""
    if max_size is not None and len(data) > max_size:
        raise ValueError(f"JSON text over {max_size} characters")
    if not depth_within(data, max_depth):
        raise ValueError(f"JSON nested deeper than {max_depth} levels")
    try:
        return json.loads(data)
    except RecursionError:  # defence in depth: the scan above should prevent it
        raise ValueError("JSON nested too deeply") from None
