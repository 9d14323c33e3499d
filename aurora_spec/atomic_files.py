"""Writes that a reader never sees half done: write a temporary file beside the target, then
``os.replace`` it into place (atomic on one filesystem). A failed write removes its temporary file
and leaves the previous version of the target as it was. Used for draft heads and checkpoints,
exports and bench results, so a crash or a full disk never leaves a torn file behind."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> None:
    """``write(tmp_path)`` fills a temporary file in ``path``'s directory; it then replaces
    ``path``. A unique temporary name, so two writers of one path never share a temporary file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
