"""Files written whole or not at all: a temporary file beside the target, then a rename."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

TMP_SUFFIX = ".tmp"


def write_atomic(path: Union[str, Path], text: str, *, durable: bool = False) -> None:
    """Write ``text`` to ``path`` so that a reader sees the old file or the new one, never
    half of one. ``durable``: also on the disk (file and directory synced) before it
    returns, so that a crash of the machine keeps it."""
    path = Path(path)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        if durable:
            fh.flush()
            os.fsync(fh.fileno())
    os.replace(tmp, path)
    if durable:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
