"""Writing a file so that a reader sees the old or the new one, never a torn one."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path


def write_atomic(path: Path, data: bytes, *, private: bool) -> None:
    """Replace ``path`` with ``data``: temp file beside it, fsync, rename, fsync the folder.

    ``private`` files (keyrings, key files, passwords) are created mode 0600
    in a folder made 0700; others get the process umask (model manifests and
    releases, which workers running as another user read). The temp file is
    removed if anything fails. Raises `OSError` as the file system does.
    """
    if private:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
