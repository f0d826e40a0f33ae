"""Build a folder once, atomically: in a private staging folder, then renamed into place.

Several processes (ranks of one job, or two jobs) may race to build the same folder. Each builds
into its own hidden sibling and renames it into place; the rename is atomic, so readers see either
no folder or a complete one, and the loser of the race drops its copy.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path


def build_once(out: Path, build: Callable[[Path], None], complete: Callable[[Path], bool]) -> None:
    """Runs `build(staging)` and publishes the result as `out`, unless `complete(out)` already holds.

    An incomplete `out` (an outdated version, a half-deleted copy) is replaced; any error from
    `build` propagates and leaves `out` as it was."""
    if complete(out):
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = _sibling(out, "tmp")
    try:
        build(staging)
        try:
            os.rename(staging, out)
        except OSError:  # another process won the race, or an outdated copy is in the way
            if not complete(out):
                _replace(out, staging, complete)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _replace(out: Path, staging: Path, complete: Callable[[Path], bool]) -> None:
    stale = _sibling(out, "old")
    try:
        os.rename(out, stale)
        os.rename(staging, out)
    except OSError:
        if not complete(out):  # a third process may have just put a copy in place
            raise
    finally:
        shutil.rmtree(stale, ignore_errors=True)


def _sibling(out: Path, kind: str) -> Path:
    return out.parent / f".{out.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
