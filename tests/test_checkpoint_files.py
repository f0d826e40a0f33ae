"""The Checkpointer's rules on tiny folders, in process: manifest, verification, choice, retention, lock."""

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from train.checkpoint import (
    CONFIG_FILE, EMA_FILE, REJECTED_DIR, STATE_FILE, CheckpointError, Checkpointer, check_resume_arg,
    checkpoint_name, choose, clean_stale_tmp, complete_checkpoints, is_sealed, move_aside, prune, publish,
    read_state, seal, verify, write_json_atomic,
)
from train.launch import Launch
from train.run_lock import LOCK_FILE, RunLock, RunLockedError
from train.state import TrainState


def make(root, step, sealed=True, complete=True, ranks=2):
    """A checkpoint folder with the files accelerate and the trainer write (tiny tensors)."""
    path = root / checkpoint_name(step)
    path.mkdir(parents=True)
    save_file({"w": torch.arange(256.0) * step}, str(path / "model.safetensors"))
    save_file({"w": torch.arange(256.0) * step + 1}, str(path / EMA_FILE))
    torch.save({"state": {0: {"exp_avg": torch.ones(256) * step}}, "param_groups": []}, path / "optimizer.bin")
    for rank in range(ranks):
        torch.save({"step": step, "rank": rank, "torch": torch.ones(64, dtype=torch.uint8)},
                   path / f"random_states_{rank}.pkl")
    (path / CONFIG_FILE).write_text("model: {dim: 8}\n")
    state = TrainState(step=step, best_metric=21.5).state_dict(stage=0, world_size=ranks)
    if complete:
        (seal if sealed else lambda p, s: write_json_atomic(p / STATE_FILE, s))(path, state)
    return path


def flip(path, name, at=0.5):
    data = bytearray((path / name).read_bytes())
    data[int(len(data) * at)] ^= 0xFF
    (path / name).write_bytes(bytes(data))


def truncate(path, name):
    size = (path / name).stat().st_size
    with open(path / name, "r+b") as f:
        f.truncate(size // 2)


def edit_state(path):
    (path / STATE_FILE).write_text((path / STATE_FILE).read_text().replace('"step": 3', '"step": 7'))


DAMAGE = {
    "model.safetensors flipped": (lambda p: flip(p, "model.safetensors"), "model.safetensors: blake3 hash differs"),
    "model.safetensors truncated": (lambda p: truncate(p, "model.safetensors"),
                                    r"model.safetensors: \d+ bytes, the manifest says \d+ \(truncated"),
    "optimizer.bin flipped": (lambda p: flip(p, "optimizer.bin"), "optimizer.bin: blake3 hash differs"),
    "ema.safetensors flipped": (lambda p: flip(p, EMA_FILE), "ema.safetensors: blake3 hash differs"),
    "trainer_state.json flipped": (lambda p: flip(p, STATE_FILE, 0.3), f"{STATE_FILE}:"),
    "trainer_state.json edited": (edit_state, f"{STATE_FILE}: its content does not match its own hash"),
    "optimizer.bin deleted": (lambda p: (p / "optimizer.bin").unlink(), "optimizer.bin: missing"),
    "a file added": (lambda p: (p / "scaler.pt").write_bytes(b"x"), "scaler.pt: not in the manifest"),
}


def test_a_sealed_checkpoint_verifies_and_keeps_its_state(tmp_path):
    path = make(tmp_path, 3)
    assert verify(path, 0) is None and verify(path, 1) is None
    state = read_state(path)
    assert state["step"] == 3 and state["best_metric"] == 21.5
    files = state["manifest"]["files"]
    assert sorted(files) == [CONFIG_FILE, EMA_FILE, "model.safetensors", "optimizer.bin", "random_states_0.pkl",
                             "random_states_1.pkl"]
    assert files["optimizer.bin"]["size"] == (path / "optimizer.bin").stat().st_size


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_damage_to_any_file_is_found_and_named(tmp_path, damage):
    path = make(tmp_path, 3)
    do, named = DAMAGE[damage]
    do(path)
    problem = verify(path, 0)
    assert problem is not None and re.match(named, problem), problem


def test_a_per_rank_file_is_checked_by_its_own_rank_only(tmp_path):
    path = make(tmp_path, 3)
    flip(path, "random_states_1.pkl")
    assert verify(path, 0) is None  # rank 0 never reads it ...
    assert verify(path, 1).startswith("random_states_1.pkl: blake3 hash differs")  # ... rank 1 does


def test_resume_auto_takes_the_newest_that_verifies_and_says_why_it_passed_over_newer_ones(tmp_path):
    paths = [make(tmp_path, s) for s in (1, 2, 3)]
    make(tmp_path, 4, complete=False)  # a folder without its state file is never a candidate
    (tmp_path / ".tmp-step_00000005").mkdir()
    flip(paths[2], "model.safetensors")
    truncate(paths[1], "optimizer.bin")
    choice = choose("auto", complete_checkpoints(tmp_path), lambda p: verify(p, 0))
    assert choice.path == paths[0] and choice.sealed
    assert [(p.name, why.split(":")[0]) for p, why in choice.rejected] == [
        ("step_00000003", "model.safetensors"), ("step_00000002", "optimizer.bin")]
    assert choose(None, complete_checkpoints(tmp_path), lambda p: verify(p, 0)).path is None
    assert choose("auto", [], lambda p: verify(p, 0)).path is None  # nothing yet: a fresh start


def test_resume_auto_refuses_when_no_checkpoint_verifies_and_moves_nothing(tmp_path):
    paths = [make(tmp_path, s) for s in (1, 2)]
    for path in paths:
        flip(path, "optimizer.bin")
    with pytest.raises(CheckpointError, match="no checkpoint of this run verifies .*step_00000002: optimizer.bin"):
        choose("auto", complete_checkpoints(tmp_path), lambda p: verify(p, 0))
    assert complete_checkpoints(tmp_path) == paths


def test_resume_path_refuses_a_damaged_checkpoint_with_the_cause(tmp_path):
    path = make(tmp_path, 3)
    truncate(path, "model.safetensors")
    with pytest.raises(CheckpointError, match=r"--resume .*: refused, model.safetensors: \d+ bytes, the manifest says"):
        choose(str(path), [], lambda p: verify(p, 0))
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        check_resume_arg(str(make(tmp_path, 4, complete=False)), tmp_path)


def test_resume_path_refuses_a_damaged_state_file_in_the_same_form(tmp_path):
    """train.main reads trainer_state.json before any process starts: its refusal reads like the others."""
    from train.config import Config
    from train.main import refuse_unmappable_resume
    from train.schedule import plan_stages

    path = make(tmp_path, 3)
    flip(path, STATE_FILE)  # a byte of the JSON text becomes >= 0x80: not UTF-8 any more
    with pytest.raises(CheckpointError, match=r"--resume .*: refused, trainer_state.json: unreadable \(UnicodeDecode"):
        refuse_unmappable_resume(str(path), Config(), plan_stages(Config(), 1))


WRONG_STATES = {  # trainer_state.json well-formed, with a field of the wrong type or range, or missing
    "step a string": (lambda state: state.update(step="x"), 'step must be an integer in [0, 2**63), got "x"'),
    "world_size 0": (lambda state: state.update(world_size=0), "world_size must be an integer in [1, 2**63), got 0"),
    "run_id missing": (lambda state: state.pop("run_id"), "missing run_id"),
    "data a list": (lambda state: state.update(data=[1]), "data must be an object, got [1]"),
    "position negative": (lambda state: state["data"].update(position=-8), "data.position must be an integer in [0"),
    "best_metric text": (lambda state: state.update(best_metric="high"), 'best_metric must be a number or null, got "high"'),
    "run_id escapes": (lambda state: state.update(run_id="\x1b[2J"), 'run_id must be a W&B run id'),
}


@pytest.mark.parametrize("sealed", [True, False], ids=["hash-recomputed", "no-manifest"])
@pytest.mark.parametrize("wrong", WRONG_STATES, ids=list(WRONG_STATES))
def test_a_state_file_with_wrong_types_is_refused_naming_the_key(tmp_path, wrong, sealed):
    """A hand-edited trainer_state.json (its hash recomputed, or its manifest dropped as an older version's
    file has none): one CheckpointError naming file and key, before anything reads the field; --resume auto
    passes over it, --resume PATH refuses it in train/main.py before any process starts."""
    from train.config import Config
    from train.main import refuse_unmappable_resume
    from train.schedule import plan_stages

    older, path = make(tmp_path, 2), make(tmp_path, 3)
    state = {k: v for k, v in json.loads((path / STATE_FILE).read_text(encoding="utf-8")).items() if k != "manifest"}
    change, message = WRONG_STATES[wrong]
    change(state)
    (path / STATE_FILE).unlink()
    (seal if sealed else lambda p, s: write_json_atomic(p / STATE_FILE, s))(path, state)
    expected = re.escape(f"{STATE_FILE}: {message}")
    with pytest.raises(CheckpointError, match=rf"--resume {re.escape(str(path))}: refused, {expected}"):
        refuse_unmappable_resume(str(path), Config(), plan_stages(Config(), 1))
    choice = choose("auto", [older, path], lambda p: verify(p, 0))
    assert choice.path == older and re.match(expected, choice.rejected[0][1])


def test_a_checkpoint_without_manifest_is_accepted_unverified(tmp_path):
    """Written by a version before manifests: accepted (with a warning from the Checkpointer)."""
    path = make(tmp_path, 3, sealed=False)
    flip(path, "optimizer.bin")  # nothing to check it against
    assert verify(path, 0) is None and not is_sealed(path)
    choice = choose("auto", [path], lambda p: verify(p, 0))
    assert choice.path == path and not choice.sealed


def test_rejected_checkpoints_are_moved_aside_never_overwritten(tmp_path):
    first = move_aside(make(tmp_path, 3))
    second = move_aside(make(tmp_path, 3))
    assert first == tmp_path / REJECTED_DIR / "step_00000003"
    assert second == tmp_path / REJECTED_DIR / "step_00000003.1"
    assert (second / "model.safetensors").is_file() and complete_checkpoints(tmp_path) == []


def test_keep_last_the_best_and_the_one_just_written(tmp_path):
    paths = [make(tmp_path, s) for s in (100, 200, 300, 400, 500)]
    removed = prune(tmp_path, keep_last=2, keep={paths[1]})
    assert sorted(p.name for p in removed) == [paths[0].name, paths[2].name]
    assert complete_checkpoints(tmp_path) == [paths[1], paths[3], paths[4]]


def test_retention_never_touches_a_later_timeline(tmp_path):
    """Resumed (--resume PATH) from step 100 while 400 and 500 exist: the run saves 200 and keeps it."""
    paths = [make(tmp_path, s) for s in (100, 400, 500)]
    written = make(tmp_path, 200)
    prune(tmp_path, keep_last=1, keep={written}, up_to=200)
    assert complete_checkpoints(tmp_path) == [written, paths[1], paths[2]]


def test_publish_replaces_and_stale_tmp_is_cleaned(tmp_path):
    old = make(tmp_path, 100)
    tmp = tmp_path / ".tmp-step_00000100"
    tmp.mkdir()
    (tmp / STATE_FILE).write_text(json.dumps({"step": 100, "new": True}))
    publish(tmp, old)
    assert json.loads((old / STATE_FILE).read_text())["new"] is True and not tmp.exists()
    (tmp_path / ".tmp-step_00000200").mkdir()
    clean_stale_tmp(tmp_path)
    assert not list(tmp_path.glob(".tmp-*"))


def _layout_checker(zero_stage, processes):
    acc = SimpleNamespace(is_main_process=True)
    launch = Launch(torch.device("cpu"), zero_stage=zero_stage, world_size=processes)
    return Checkpointer(Path("/nonexistent"), acc, launch, keep_last=1)


@pytest.mark.parametrize("saved,now", [(2, 1), (1, 2)])
def test_deepspeed_resume_on_another_process_count_is_refused_up_front(tmp_path, saved, now):
    path = make(tmp_path, 3, ranks=saved)
    (path / "pytorch_model").mkdir()
    checker = _layout_checker(2, now)
    with pytest.raises(CheckpointError, match=f"written by {saved} processes and this run has {now}.*Resume with {saved}"):
        checker._check_layout(path, read_state(path))
    _layout_checker(2, saved)._check_layout(path, read_state(path))  # same count: fine
    with pytest.raises(CheckpointError, match="written with DeepSpeed and this run is not under DeepSpeed"):
        _layout_checker(None, now)._check_layout(path, read_state(path))
    (path / "pytorch_model").rmdir()  # a DDP checkpoint: any process count resumes it
    _layout_checker(None, now)._check_layout(path, read_state(path))


# ---------------------------------------------------------------- the run lock


def test_a_live_holder_keeps_the_folder_and_is_named(tmp_path):
    held = RunLock(tmp_path)
    assert held.acquire() is None
    try:
        with pytest.raises(RunLockedError, match=rf"in use by another run \(host {socket.gethostname()}, "
                                                 rf"pid {os.getpid()}, started 20"):
            RunLock(tmp_path).acquire()
    finally:
        held.release()
    assert (tmp_path / LOCK_FILE).read_text() == ""  # released: emptied, not deleted
    second = RunLock(tmp_path)
    assert second.acquire() is None  # a cleanly released lock is free, no message
    second.release()


def dead_pid() -> int:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    return dead.pid


def test_the_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path):
    pid = dead_pid()
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": pid,
                                                  "started": "2026-01-01T00:00:00+00:00", "proc_start": "1"}))
    lock = RunLock(tmp_path)
    note = lock.acquire()
    try:
        assert note.startswith("took over the lock of a run that is no longer alive") and f"pid {pid}," in note
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    finally:
        lock.release()


def test_a_lock_still_held_by_a_dead_holders_child_is_refused_and_says_so(tmp_path):
    held = RunLock(tmp_path)  # stands for the data-loader worker the dead process forked
    held.acquire()
    try:
        (tmp_path / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": dead_pid(),
                                                      "started": "2026-01-01T00:00:00+00:00", "proc_start": "1"}))
        with pytest.raises(RunLockedError, match="that process is gone but one it forked still holds the lock"):
            RunLock(tmp_path).acquire()
    finally:
        held.release()


def test_another_hosts_lock_counts_while_its_heartbeat_is_fresh(tmp_path):
    """For file systems whose flock is per node: the holder's heartbeat (the file's mtime) decides."""
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": "node-7", "pid": 4242, "started": "2026-01-01T00:00:00+00:00",
                                                  "proc_start": None}))
    with pytest.raises(RunLockedError, match="host node-7, pid 4242.*last heartbeat"):
        RunLock(tmp_path, stale_s=120).acquire()
    old = time.time() - 600
    os.utime(tmp_path / LOCK_FILE, (old, old))
    lock = RunLock(tmp_path, stale_s=120)
    assert "no heartbeat for 600 s" in lock.acquire()
    lock.release()


def test_the_holder_beats_while_it_runs(tmp_path):
    lock = RunLock(tmp_path, heartbeat_s=0.05)
    lock.acquire()
    try:
        old = time.time() - 600
        os.utime(tmp_path / LOCK_FILE, (old, old))
        time.sleep(0.3)
        assert time.time() - (tmp_path / LOCK_FILE).stat().st_mtime < 5
    finally:
        lock.release()
