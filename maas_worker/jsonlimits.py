"""JSON from anyone else is bounded before it is parsed: size, then nesting depth.

Python's ``json`` parser recurses once per nesting level: a document nested
a few hundred thousand levels deep (a few hundred kilobytes of ``[``) raises
`RecursionError`, which is not a `ValueError` and escaped every handler that
expected one. Every untrusted document (a queue entry, a Celery message body,
a job's decrypted input) passes `loads` instead: over the depth limit it is a
plain `ValueError`, like any other malformed document.

The check costs two ``bytes.count`` calls for ordinary documents (fewer
brackets than the limit cannot nest deeper than it); only a document with
many brackets is scanned, skipping string literals, and the scan stops at
the first level past the limit.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

#: Deepest nesting of a job's input (the models' own inputs nest 2 or 3 deep).
MAX_INPUT_DEPTH = 64
#: Deepest nesting of a queue entry or a Celery message body (Celery's are 3 deep).
MAX_MESSAGE_DEPTH = 16

# A string literal (escapes included), or one bracket.
_TOKENS_B = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.DOTALL)
_TOKENS_S = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.DOTALL)


def depth_within(data: str | bytes, max_depth: int) -> bool:
    """Whether the JSON text ``data`` nests at most ``max_depth`` levels deep.

    Exact for valid JSON; for invalid text it may say either, and the parser
    then refuses the text anyway.
    """
    if isinstance(data, str):
        opens = data.count("[") + data.count("{")
        tokens: Iterator[re.Match[str]] | Iterator[re.Match[bytes]] = _TOKENS_S.finditer(data)
    else:
        opens = data.count(b"[") + data.count(b"{")
        tokens = _TOKENS_B.finditer(data)
    if opens <= max_depth:
        return True
    depth = 0
    for m in tokens:
        ch = m.group()[:1]
        if ch in ("[", "{", b"[", b"{"):
            depth += 1
            if depth > max_depth:
                return False
        elif ch in ("]", "}", b"]", b"}"):
            depth -= 1
    return True


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
