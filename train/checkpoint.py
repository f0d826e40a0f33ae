"""Checkpoints of the full training state: written under a temporary name, sealed with a manifest,
verified on load, renamed when complete. The Checkpointer owns the run folder's layout:

    run.lock                        held by the run using this folder (train/run_lock.py)
    config.yaml                     the resolved config of the latest start
    checkpoints/step_00001000/      accelerate's save_state files (model.safetensors, optimizer.bin,
                                    random_states_<rank>.pkl, scaler.pt; DeepSpeed: pytorch_model/),
                                    ema.safetensors, config.yaml and trainer_state.json (written last)
    checkpoints/.tmp-step_.../      a checkpoint being written; never chosen for resume
    checkpoints/rejected/step_...   checkpoints `--resume auto` passed over because they failed
                                    verification: moved aside, never deleted
    export/                         the final weights (train/exporting.py)

Integrity: trainer_state.json, the last file written, holds the trainer's state, a manifest of every
other file of the checkpoint (size and BLAKE3 hash) and the hash of its own content. Before loading,
every rank checks the files it is going to read (the shared ones and its own per-rank ones) and the
ranks agree on one verdict, so damage that only one node sees stops every rank. A checkpoint written
before manifests existed (no "manifest" entry) is accepted with a warning: it cannot be verified.

`--resume auto` takes the newest checkpoint that verifies; the newer ones it passes over are moved to
checkpoints/rejected/ with the reason printed. When none verifies it refuses (exit 2) and moves
nothing. `--resume PATH` refuses a checkpoint that does not verify. Retention keeps the newest
`keep_last` up to the step just saved, the best one and the one just written (hashed as it was read
back, so it verified); it never deletes checkpoints of a later step (another timeline the user
resumed away from) and so never removes the newest checkpoint that verifies.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blake3 import blake3

from data_shards.atomic import atomic_write, fsync_path
from train.distributed import any_rank, from_main, gather_objects
from train.launch import Launch
from train.run_lock import RunLock, RunLockedError
from train.state import saved_state_problem

STATE_FILE = "trainer_state.json"
CONFIG_FILE = "config.yaml"
EMA_FILE = "ema.safetensors"
MODEL_FILE = "model.safetensors"  # accelerate's name for the model weights in a checkpoint (not under DeepSpeed)
CHECKPOINTS_DIR = "checkpoints"
EXPORT_DIR = "export"
REJECTED_DIR = "rejected"
DEEPSPEED_DIR = "pytorch_model"  # accelerate's save_state puts a DeepSpeed checkpoint under this tag
_NAME = re.compile(r"^step_(\d{8,})$")
# Files only one rank reads: its RNG state, its slice of a DeepSpeed optimizer.
_PER_RANK = re.compile(r"(?:^|/)(?:random_states_(\d+)\.pkl|zero_pp_rank_(\d+)_[^/]*)$")
# BLAKE3: a cryptographic 256-bit hash, ~4x faster than sha256 here (benchmarks/checkpoint_speed.py).
HASH = "blake3"


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


def check_resume_arg(arg: str | None, root: Path) -> None:
    """The checks `--resume` can get before any process starts: a PATH must be a complete checkpoint."""
    if arg is None or arg == "auto":
        return
    if not (Path(arg) / STATE_FILE).is_file():
        raise CheckpointError(
            f"--resume {arg}: not a complete checkpoint (no {STATE_FILE} inside); "
            f"complete ones under {root}: {[p.name for p in complete_checkpoints(root)] or 'none'}"
        )


# ---------------------------------------------------------------- the manifest


def _digest(path: Path) -> dict[str, Any]:
    size = path.stat().st_size
    digest = blake3(max_threads=blake3.AUTO)
    if size:  # mmap refuses empty files
        digest.update_mmap(path)
    return {"size": size, HASH: digest.hexdigest()}


def _files(folder: Path) -> list[str]:
    """Every file of a checkpoint but its state file, as paths relative to it."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.name != STATE_FILE)


def _hash_all(folder: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    # Small files (RNG states, config) hash in parallel with the big ones, which use every core anyway.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return dict(zip(names, pool.map(lambda name: _digest(folder / name), names)))


def _content_hash(doc: dict[str, Any]) -> str:
    return blake3(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def seal(folder: Path, state: dict[str, Any]) -> None:
    """Writes trainer_state.json: `state`, the manifest of the folder's other files, its own hash."""
    doc = {**state, "manifest": {"algorithm": HASH, "files": _hash_all(folder, _files(folder))}}
    doc["manifest"]["state_hash"] = _content_hash(doc)
    write_json_atomic(folder / STATE_FILE, doc)


def read_state(path: Path) -> dict[str, Any]:
    """The trainer state of a checkpoint, checked against its own hash when it carries one, and its
    fields' types (train.state.saved_state_problem): CheckpointError names the file and the key."""
    try:
        doc = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise CheckpointError(f"{STATE_FILE}: unreadable ({type(err).__name__}: {err})") from err
    if not isinstance(doc, dict):
        raise CheckpointError(f"{STATE_FILE}: not a JSON object")
    manifest = doc.get("manifest")
    if manifest is not None:
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
            raise CheckpointError(f"{STATE_FILE}: its manifest is damaged")
        if manifest.get("algorithm") != HASH:
            raise CheckpointError(f"{STATE_FILE}: its manifest uses the hash {manifest.get('algorithm')!r}, which "
                                  f"this version does not know ({HASH})")
        saved = manifest.get("state_hash")
        unsealed = {**doc, "manifest": {k: v for k, v in manifest.items() if k != "state_hash"}}
        if saved != _content_hash(unsealed):
            raise CheckpointError(f"{STATE_FILE}: its content does not match its own hash (damaged or edited "
                                  "after it was written)")
    problem = saved_state_problem(doc)
    if problem:
        raise CheckpointError(f"{STATE_FILE}: {problem} (written by another version, or edited)")
    return doc


def is_sealed(path: Path) -> bool:
    return "manifest" in read_state(path)


def _read_by(name: str, rank: int) -> bool:
    match = _PER_RANK.search(name)
    return match is None or int(match.group(1) or match.group(2)) == rank


def verify(path: Path, rank: int = 0) -> str | None:
    """What is wrong with the files `rank` would read from checkpoint `path`, or None.

    A checkpoint without a manifest (an older version) has nothing to check against: None."""
    try:
        files = read_state(path).get("manifest", {}).get("files")
    except CheckpointError as err:
        return str(err)
    if files is None:
        return None
    present = set(_files(path))
    mine = sorted(name for name in present | set(files) if _read_by(name, rank))
    missing = [name for name in mine if name not in present]
    if missing:
        return f"{missing[0]}: missing (listed in the manifest)"
    unlisted = [name for name in mine if name not in files]
    if unlisted:
        return f"{unlisted[0]}: not in the manifest (added after the checkpoint was written)"
    for name, got in _hash_all(path, mine).items():
        want = files[name]
        if got["size"] != want.get("size"):
            return f"{name}: {got['size']} bytes, the manifest says {want.get('size')} (truncated or overwritten)"
        if got[HASH] != want.get(HASH):
            return f"{name}: {HASH} hash differs from the manifest (damaged or changed after it was written)"
    return None


# ---------------------------------------------------------------- choosing the checkpoint to resume


@dataclass(frozen=True)
class Choice:
    path: Path | None
    rejected: tuple[tuple[Path, str], ...] = ()  # newer checkpoints passed over, and why
    sealed: bool = True  # False: written before manifests, not verified


def choose(arg: str | None, candidates: list[Path], check: Callable[[Path], str | None]) -> Choice:
    """`auto`: the newest of `candidates` (oldest first) that `check` passes; a path: that one, checked."""
    if arg is None:
        return Choice(None)
    if arg != "auto":
        path = Path(arg)
        problem = check(path)
        if problem is not None:
            raise refused(arg, problem)
        return Choice(path, (), is_sealed(path))
    rejected = []
    for path in reversed(candidates):
        problem = check(path)
        if problem is None:
            return Choice(path, tuple(rejected), is_sealed(path))
        rejected.append((path, problem))
    if rejected:
        listed = "; ".join(f"{p.name}: {why}" for p, why in rejected)
        raise CheckpointError(f"--resume auto: no checkpoint of this run verifies ({listed}). Nothing was moved or "
                              "deleted. Restore them from a copy, resume from a checkpoint elsewhere "
                              "(--resume PATH), or start a new run with another output_dir/run_name")
    return Choice(None)


def refused(arg: str, problem: str) -> CheckpointError:
    """The one form of the error for a damaged checkpoint given as --resume PATH."""
    return CheckpointError(f"--resume {arg}: refused, {problem}. Resume from another checkpoint, or with "
                           "--resume auto to take the newest one that verifies")


# ---------------------------------------------------------------- files and folders


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")


def publish(tmp_dir: Path, final_dir: Path) -> None:
    """Makes a fully written checkpoint visible under its final name."""
    if final_dir.exists():  # the same step saved again (e.g. after resuming from an older checkpoint)
        _retire(final_dir)
    os.replace(tmp_dir, final_dir)
    fsync_path(final_dir.parent)  # persist the rename itself, or a power cut could leave neither name


def prune(root: Path, keep_last: int, keep: set[Path], up_to: int | None = None) -> list[Path]:
    """Deletes complete checkpoints beyond the newest `keep_last` of those at step <= `up_to`, sparing
    `keep`; checkpoints of later steps are never touched. Returns the deleted ones."""
    found = [p for p in complete_checkpoints(root)
             if up_to is None or int(_NAME.match(p.name).group(1)) <= up_to]
    spared = {k.resolve() for k in keep}
    doomed = [p for p in found[: max(len(found) - keep_last, 0)] if p.resolve() not in spared]
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


def move_aside(path: Path) -> Path:
    """Moves a rejected checkpoint to <root>/rejected/<name>[.N]; returns where it went."""
    folder = path.parent / REJECTED_DIR
    folder.mkdir(exist_ok=True)
    target, n = folder / path.name, 1
    while target.exists():
        target, n = folder / f"{path.name}.{n}", n + 1
    os.replace(path, target)
    fsync_path(path.parent)
    return target


def clean_stale_tmp(root: Path) -> None:
    """Removes checkpoints a killed run left half-written. Call it only while holding the run lock:
    then no live run is writing them."""
    if root.is_dir():
        for path in root.glob(".tmp-step_*"):
            shutil.rmtree(path, ignore_errors=True)


def _first_line(err: BaseException) -> str:
    lines = [line for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


def _loads_safely(path: Path) -> bool:
    from accelerate.utils.other import load  # torch.load(weights_only=True) + numpy's safe types

    try:
        load(path, map_location="cpu")
    except Exception:  # whatever the reason, this is a file the resume could not use
        return False
    return True


def _load_failure(path: Path, failure: Exception | None, rank: int) -> str:
    if failure is None:
        cause = "another process could not load its part"
    elif isinstance(failure, pickle.UnpicklingError):
        # accelerate reads these with torch.load(weights_only=True): find which one it refused.
        refused = [name for name in ("optimizer.bin", "scaler.pt", f"random_states_{rank}.pkl")
                   if (path / name).is_file() and not _loads_safely(path / name)]
        cause = (f"{', '.join(refused) or 'a file'} could not be read as plain tensors and arrays (a pickle "
                 "that would run code, or a damaged file): torch.load(weights_only=True) refused it, nothing in it ran")
    else:
        cause = _first_line(failure)
    return (f"cannot resume from {path}: {cause}. Resume from another checkpoint (--resume PATH), or move "
            "this one out of the checkpoints folder to let --resume auto pick the previous one")


# ---------------------------------------------------------------- the Checkpointer


@dataclass(frozen=True)
class Loaded:
    state: dict[str, Any]  # what the trainer's state_dict() returned when saving
    ema: dict[str, Any] | None  # the EMA weights, when asked for and present


@dataclass(frozen=True)
class SaveTiming:
    write_s: float  # accelerate's save_state, the EMA and the config
    seal_s: float  # hashing every file into the manifest and writing trainer_state.json


class Checkpointer:
    """Saving, loading, verifying and pruning checkpoints, and the run folder's lock.

    Every method is collective (all ranks call it); the main process alone touches shared files."""

    def __init__(self, run_dir: Path, accelerator, launch: Launch, keep_last: int):
        self.run_dir = Path(run_dir)
        self.acc = accelerator
        self.launch = launch
        self.keep_last = keep_last
        self.root = self.run_dir / CHECKPOINTS_DIR
        self.export_dir = self.run_dir / EXPORT_DIR
        self.main = accelerator.is_main_process
        self._lock = RunLock(self.run_dir) if self.main else None
        self._saved_step: int | None = None
        self.last_timing: SaveTiming | None = None

    # ---------------------------------------------------------- the run folder

    def claim_run_folder(self, config_yaml: str) -> None:
        """Locks the run folder for this run (held until release_run_folder), then writes its config.yaml."""
        failure = None
        if self.main:
            try:
                note = self._lock.acquire()
                if note:
                    print(f"run lock: {note}", file=sys.stderr, flush=True)
                (self.run_dir / CONFIG_FILE).write_text(config_yaml, encoding="utf-8")
            except (RunLockedError, OSError) as err:
                failure = err
        if any_rank(self.acc, failure is not None):
            raise CheckpointError(str(failure) if failure else "the main process could not lock the run folder")

    def release_run_folder(self) -> None:
        if self._lock is not None:
            self._lock.release()

    def newest(self) -> str:
        found = complete_checkpoints(self.root)
        return str(found[-1]) if found else "none (no checkpoint was written yet)"

    def verdict(self, path: Path) -> str | None:
        """verify() on every rank; one answer for all, naming the ranks that saw a problem."""
        seen = gather_objects(self.acc, verify(path, self.launch.rank))
        bad = [(rank, problem) for rank, problem in enumerate(seen) if problem is not None]
        if not bad:
            return None
        if len(bad) == len(seen) and len({p for _, p in bad}) == 1:
            return bad[0][1]
        return "; ".join(f"rank {rank}: {problem}" for rank, problem in bad)

    # ---------------------------------------------------------- resume

    def resume_point(self, arg: str | None) -> Path | None:
        """The checkpoint to resume from (see the module docstring), or None for a fresh start. Called
        before the model is built: what cannot be resumed here is refused up front."""
        candidates = from_main(self.acc, complete_checkpoints(self.root) if arg == "auto" else [])
        choice = choose(arg, candidates, self.verdict)
        if self.main:
            for path, problem in choice.rejected:
                moved = move_aside(path)
                print(f"--resume auto: rejected {path.name} ({problem}); moved to {moved}", file=sys.stderr, flush=True)
            if choice.path is not None and not choice.sealed:
                print(f"warning: {choice.path} has no manifest (written by an older version): its files cannot be "
                      "verified", file=sys.stderr, flush=True)
        self.acc.wait_for_everyone()
        if choice.path is not None:
            self._check_layout(choice.path, read_state(choice.path))
        return choice.path

    def load(self, path: Path, network_changes: Callable[[Path], list[str]], with_ema: bool) -> Loaded:
        """Loads accelerate's state (model, optimizer, scaler, RNG) from `path`, a resume_point(), into the
        prepared objects.
        network_changes(config.yaml) lists how the checkpoint's network differs from this run's."""
        state = read_state(path)
        changed = network_changes(path / CONFIG_FILE)
        if changed:
            raise CheckpointError(
                f"cannot resume from {path}: the network's shape changed ({'; '.join(changed)}). "
                "Resume with the checkpoint's model settings, or start a new run that fine-tunes "
                f"from its weights with model.init_weights={path / MODEL_FILE}"
            )
        failure, ema = None, None
        try:
            self.acc.load_state(str(path))
            rng_file = path / f"random_states_{self.launch.rank}.pkl"
            if rng_file.is_file() and not _loads_safely(rng_file):
                # accelerate skips an RNG file it cannot load without a word: a tampered one must not pass.
                raise pickle.UnpicklingError(f"{rng_file} was refused")
            if with_ema and (path / EMA_FILE).is_file():
                from safetensors.torch import load_file

                ema = load_file(str(path / EMA_FILE))
        except Exception as err:  # a damaged file, or a pickle that torch.load(weights_only=True) refused
            failure = err
        # All ranks fail together: a rank that went on training alone would wait for the others forever.
        if any_rank(self.acc, failure is not None):
            raise CheckpointError(_load_failure(path, failure, self.launch.rank))
        self._saved_step = int(state["step"])
        return Loaded({k: v for k, v in state.items() if k != "manifest"}, ema)

    def _check_layout(self, path: Path, state: dict[str, Any]) -> None:
        """Refuses, before loading anything, what accelerate/DeepSpeed would fail on half-way."""
        deepspeed = self.launch.deepspeed
        written_by_deepspeed = (path / DEEPSPEED_DIR).is_dir()
        if deepspeed != written_by_deepspeed:
            raise CheckpointError(
                f"cannot resume from {path}: it was written {'with' if written_by_deepspeed else 'without'} "
                f"DeepSpeed and this run is {'' if deepspeed else 'not '}under DeepSpeed. Resume with the launcher "
                "config it was written with, or start a new run from its weights (model.init_weights=...)")
        saved_world = state.get("world_size")
        if deepspeed and saved_world is not None and saved_world != self.launch.world_size:
            raise CheckpointError(
                f"cannot resume from {path}: this DeepSpeed checkpoint was written by {saved_world} processes and "
                f"this run has {self.launch.world_size}; ZeRO's optimizer state is partitioned per process and "
                f"DeepSpeed cannot re-partition it on load. Resume with {saved_world} processes, or start a new "
                f"run from its consolidated weights (python -m tools.export -w {path} -o DIR, then "
                "model.init_weights=DIR/model.safetensors; the optimizer state starts afresh)")

    # ---------------------------------------------------------- save

    def save(self, step: int, state: dict[str, Any], ema: dict[str, Any] | None, config_yaml: str,
             best_step: int | None) -> Path:
        """Writes, seals and publishes the checkpoint of `step`, then prunes older ones."""
        name = checkpoint_name(step)
        final = self.root / name
        if step == self._saved_step:
            return final
        tmp = self.root / f".tmp-{name}"
        t0 = time.perf_counter()
        failure = self._write(tmp, ema, config_yaml)
        # Every rank learns whether any rank failed (this reduce is also the barrier before sealing).
        if any_rank(self.acc, failure is not None):
            raise self._failed(step, tmp, failure)
        t1 = time.perf_counter()
        if self.main:
            try:
                seal(tmp, state)  # every rank's files are written: hash them all, then mark it complete
            except Exception as err:  # disk full again, while writing trainer_state.json
                failure = err
        if any_rank(self.acc, failure is not None):
            raise self._failed(step, tmp, failure)
        self.last_timing = SaveTiming(t1 - t0, time.perf_counter() - t1)
        if self.main:
            publish(tmp, final)
            keep = {final} | ({self.root / checkpoint_name(best_step)} if best_step is not None else set())
            prune(self.root, self.keep_last, keep, up_to=step)
        self.acc.wait_for_everyone()
        self._saved_step = step
        return final

    def _write(self, tmp: Path, ema: dict[str, Any] | None, config_yaml: str) -> Exception | None:
        """Writes this rank's part of a checkpoint into `tmp`. Returns the error instead of raising: a
        rank that raised alone would leave the others waiting in the next collective."""
        failure = None
        if self.main:
            try:
                clean_stale_tmp(self.root)
                tmp.mkdir(parents=True)
            except OSError as err:
                failure = err
        self.acc.wait_for_everyone()
        if failure is not None:
            return failure
        try:
            self.acc.save_state(str(tmp), safe_serialization=True)
            if self.main:
                if ema is not None:
                    from safetensors.torch import save_file

                    save_file(ema, str(tmp / EMA_FILE))
                (tmp / CONFIG_FILE).write_text(config_yaml, encoding="utf-8")
        except Exception as err:  # open(), torch.save and safetensors each report a full disk their own way
            return err
        return None

    def _failed(self, step: int, tmp: Path, failure: Exception | None) -> CheckpointError:
        cause = _first_line(failure) if failure is not None else "another process could not write its part"
        try:  # measured before the cleanup: the free space it reports is the cause
            free = f"{shutil.disk_usage(self.root).free / 2**20:.0f} MiB free there"
        except OSError:
            free = "free space unknown"
        if self.main:
            shutil.rmtree(tmp, ignore_errors=True)
        return CheckpointError(
            f"could not write the checkpoint of step {step} into {tmp} ({cause}; {free}). Nothing was "
            f"published; the newest complete checkpoint is still {self.newest()}. Free disk space (or lower "
            "train.keep_last, or move output_dir), then resume with --resume auto")

    # ---------------------------------------------------------- export

    def export(self, checkpoint: Path, trained: dict[str, Any] | None, ema: dict[str, Any] | None,
               arch: dict[str, Any]) -> dict[str, str]:
        """Writes export/ (train/exporting.py) on the main process. trained=None: a DeepSpeed run, whose
        fp32 master weights are consolidated from `checkpoint` (any ZeRO stage)."""
        from train.exporting import Weights, write_export

        written = {}
        if self.main:
            if trained is None:
                from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

                trained = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=DEEPSPEED_DIR)
            written = {kind: str(p) for kind, p in write_export(self.export_dir, Weights(trained, arch, ema)).items()}
        self.acc.wait_for_everyone()
        return written
