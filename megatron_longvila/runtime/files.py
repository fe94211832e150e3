"""Small file helpers shared by the checkpoint writers."""

from __future__ import annotations

import os

__all__ = ["write_text_atomic"]


def write_text_atomic(path: str, text: str) -> str:
    """Write `text` to `path` through `path`.tmp, fsynced, then renamed: a reader (or a crash) never sees half a
    file under the final name. Returns `path`."""
    with open(path + ".tmp", "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    return path
