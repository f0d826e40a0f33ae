"""Checkpoints of the full training state: written under a temporary name, renamed when complete.

Layout of a run folder:
    checkpoints/step_00001000/   accelerate's save_state files (model.safetensors, optimizer.bin,
                                 random_states_<rank>.pkl, scaler.pt), ema.safetensors,
                                 config.yaml and trainer_state.json (written last)
    checkpoints/.tmp-step_.../   a checkpoint being written; never chosen for resume

A checkpoint folder whose name is `step_<digits>` exists only after every file in it was written,
so `--resume auto` can trust any such folder. Retention keeps the newest `keep_last` and the best.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

STATE_FILE = "trainer_state.json"
CONFIG_FILE = "config.yaml"
_NAME = re.compile(r"^step_(\d{8,})$")


class CheckpointError(RuntimeError):
    pass


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _NAME.match(path.name)
        if match and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def resolve_resume(arg: str | None, root: Path) -> Path | None:
    """`auto`: newest complete checkpoint of the run or None; a path: that checkpoint, checked."""
    if arg is None:
        return None
    if arg == "auto":
        found = complete_checkpoints(root)
        return found[-1] if found else None
    path = Path(arg)
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(
            f"--resume {arg}: not a complete checkpoint (no {STATE_FILE} inside); "
            f"complete ones under {root}: {[p.name for p in complete_checkpoints(root)] or 'none'}"
        )
    return path


def read_state(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path / STATE_FILE}: unreadable trainer state ({err})") from err


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def publish(tmp_dir: Path, final_dir: Path) -> None:
    """Makes a fully written checkpoint visible under its final name."""
    if final_dir.exists():  # the same step saved again (e.g. after resuming from an older checkpoint)
        _retire(final_dir)
    os.replace(tmp_dir, final_dir)
    # Persist the rename itself, or a power cut could leave neither name on disk.
    fd = os.open(final_dir.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prune(root: Path, keep_last: int, keep: set[Path]) -> list[Path]:
    """Deletes complete checkpoints beyond the newest `keep_last`, sparing `keep`; returns them."""
    found = complete_checkpoints(root)
    doomed = [p for p in found[: max(len(found) - keep_last, 0)] if p.resolve() not in {k.resolve() for k in keep}]
    for path in doomed:
        try:
            _retire(path)
        except OSError:  # retention is housekeeping: a checkpoint that cannot be deleted just stays
            pass
    return doomed


def _retire(path: Path) -> None:
    """Deletes a checkpoint folder. Renamed first: a process killed during the deletion must not leave
    a `step_*` folder that still holds trainer_state.json but lacks other files (it would look complete)."""
    doomed = path.with_name(f".tmp-{path.name}.deleting")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def clean_stale_tmp(root: Path) -> None:
    """Removes checkpoints a killed run left half-written."""
    if root.is_dir():
        for path in root.glob(".tmp-step_*"):
            shutil.rmtree(path, ignore_errors=True)
