"""Files that appear whole or not at all, and survive a power cut once written.

Every file the project writes for another process or a later run to read (shards, indexes, weights,
checkpoint state, the shard cache's manifest) goes through here: written under a temporary name in
the same folder (a rename within one file system is atomic), flushed and fsynced, renamed into
place, and the folder fsynced so that the rename itself is on disk. A failure deletes the
temporary file and leaves the old file, if any, as it was.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_write", "fsync_path", "replace_durably"]


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, tmp: str | os.PathLike | None = None) -> Iterator[Path]:
    """Yields a temporary path beside `path` for the caller to write (by name: torch.save, safetensors,
    open(...)); when the block ends without an exception it becomes `path` (replace_durably).
    `tmp`: the temporary name, for a caller whose cleanup recognises its own names; default a
    fresh hidden name (.NAME.XXXXXXXX.tmp), so concurrent writers never share one. The folder is
    created when missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if tmp is None:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        tmp = name
    tmp = Path(tmp)
    try:
        yield tmp
        replace_durably(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def replace_durably(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Renames the complete file `tmp` to `path` (same folder) after its bytes are on disk, then makes
    the rename durable. For a writer that holds its temporary file open across calls (a tar shard)."""
    fsync_path(tmp)  # what the writer handed to the OS (closed or flushed) is now forced to disk
    os.replace(tmp, path)
    fsync_path(Path(path).parent)


def fsync_path(path: str | os.PathLike) -> None:
    """Forces a file's bytes, or a folder's entries (a rename, a new name), to disk: without it a power
    cut can lose them."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
