"""File permissions as the user's umask says, for files that libraries create private.

Usage::

    from cllora.files import as_umask
    save_file(tensors, str(path))      # safetensors writes 0600, whatever the umask
    as_umask(path)                     # now 0644 under umask 022, like any file the user writes

safetensors creates its files with mode 0600 and ``tempfile.mkdtemp`` its directories with
0700, so an adapter, a checkpoint or the converted model cache could not be read by the user's
group or a shared account, unlike every other file of a run. :func:`as_umask` gives a file (or a
directory and everything under it) the mode a plain ``open`` or ``mkdir`` would have given.
A leaf module: it imports nothing of cllora.
"""

from __future__ import annotations

import os
from pathlib import Path

_umask: int | None = None


def umask() -> int:
    """The process's umask (read once: reading it means setting it)."""
    global _umask
    if _umask is None:
        _umask = os.umask(0o022)
        os.umask(_umask)
    return _umask


def as_umask(path: str | Path) -> None:
    """Give ``path`` (and, for a directory, everything under it) the umask's default mode."""
    path = Path(path)
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for p in paths:
        if p.is_symlink():
            continue
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask())
