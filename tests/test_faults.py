"""Fault injection: what a crash, a preemption, a dead rank or a bad file costs a training run.

Each `scenario_*` function injects one fault into real `train/main.py` processes (or runs the packer
and the config in process), asserts what must survive it and returns one line saying what it
observed. The tests below call them; `benchmarks/faults.py` runs them all and prints the table that
docs/reliability.md explains.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import pickle
import random
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import (ROOT, TINY_NET_ARGS, TINY_RUN, accelerate_cmd, child_env, format1_index, image_bomb,
                      loopback_http,
                      pack_images, records, tiny_net)
from model import read_state_dict
from data_shards.index import MAX_INDEX_BYTES, MAX_SAMPLE_BYTES, ShardIndex, describe_shard
from data_shards.remote import CACHE_SUBFOLDER, ShardCache
from train import checkpoint as ckpt
from train.config import load_config
from train.schedule import lr_at, plan_stages

LONG = ["progressive.iters=[400,400]", "val.every=1000", "train.ckpt_every=1000"]  # a run that a fault stops
CHECKPOINT_FILES = ("model.safetensors", "optimizer.bin", "random_states_0.pkl", ckpt.CONFIG_FILE, ckpt.STATE_FILE)


# ---------------------------------------------------------------- data, processes, run folders


def make_shards(root: Path) -> Path:
    """conftest's ten synthetic images: 8 train in 4 shards, 2 val."""
    return pack_images(root, False, "--shard-samples", "2")


class Launch:
    """A training process (or an `accelerate launch` of several) with its output in files: a pipe that
    nobody reads would block a long run on a full buffer."""

    def __init__(self, argv: list[str], log: Path, preexec_fn=None, **env: str):
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(f"{log}.out", "w") as out, open(f"{log}.err", "w") as err:
            self.proc = subprocess.Popen(argv, cwd=ROOT, env=child_env(**env), stdout=out, stderr=err,
                                         preexec_fn=preexec_fn)
        self.started = time.monotonic()
        self.started_wall = time.time()

    def wait(self, timeout: float = 240) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"{self.log}: still running after {timeout} s (a hang):\n{self.stderr[-2000:]}")

    @property
    def stdout(self) -> str:
        return Path(f"{self.log}.out").read_text()

    @property
    def stderr(self) -> str:
        return Path(f"{self.log}.err").read_text()


def launch(data: Path, out: Path, *extra: str, resume: str | None = "auto", processes: int = 1,
           script: Path | None = None, log: Path | None = None, preexec_fn=None) -> Launch:
    args = [f"data.train={data}/train", f"data.val={data}/val", f"output_dir={out}", *TINY_RUN, *extra]
    if resume is not None:
        args[:0] = ["--resume", resume]
    entry = str(script or "train/main.py")
    if processes > 1:
        argv, env = accelerate_cmd(processes) + [entry, *args], {"ACCELERATE_USE_CPU": "1"}
    else:
        argv, env = [sys.executable, entry, *args], {}
    log = log or out.parent / f"{out.name}-launch{len(list(out.parent.glob(f'{out.name}-launch*.out')))}"
    return Launch(argv, log, preexec_fn=preexec_fn, **env)


def step_records(run: Path) -> list[dict]:
    return [r for r in records(run) if "event" not in r]


def wait_for(condition, launch: Launch, what: str, timeout: float = 120, poll: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if launch.proc.poll() is not None:
            raise AssertionError(f"the run exited ({launch.proc.returncode}) before {what}:\n{launch.stderr[-2000:]}")
        time.sleep(poll)
    raise AssertionError(f"no {what} within {timeout} s")


def assert_complete(folder: Path, processes: int = 1) -> None:
    names = {*CHECKPOINT_FILES, *(f"random_states_{r}.pkl" for r in range(processes))}
    missing = sorted(n for n in names if not (folder / n).is_file())
    assert not missing, f"{folder} looks complete but lacks {missing}"
    weights = read_state_dict(folder / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values()), f"{folder}: non-finite weights"


def newest(run: Path) -> Path | None:
    found = ckpt.complete_checkpoints(run / "checkpoints")
    return found[-1] if found else None


def step_of(folder: Path | None) -> int:
    return 0 if folder is None else json.loads((folder / ckpt.STATE_FILE).read_text())["step"]


def resumed_from(stdout: str) -> tuple[str, int] | None:
    match = re.search(r"resumed from (\S+) at step (\d+)", stdout)
    return (match.group(1), int(match.group(2))) if match else None


def last_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    return lines[-1] if lines else ""


# ---------------------------------------------------------------- kill -9 and resume


KILL_RUN = ["progressive.iters=[20,20]", "train.ckpt_every=2", "val.every=5", "train.keep_last=2"]


def _freeze_at(proc: Launch, run: Path, moment: str, rng: random.Random, val_every: int) -> str:
    """Waits until the run is at `moment`, then stops it (SIGSTOP) so that where it is can be checked
    without a race. A moment that already passed when checked is let go (SIGCONT); the next is awaited."""
    root = run / "checkpoints"
    start_steps = {r["step"] for r in step_records(run)}
    wanted_steps = rng.randint(1, 3)
    let_go: set[int] = set()
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.proc.poll() is not None:
            raise AssertionError(f"the run ended before a '{moment}' moment came:\n{proc.stderr[-2000:]}")
        if moment == "step":
            new = [r["step"] for r in step_records(run) if r["step"] not in start_steps]
            if len(new) >= wanted_steps:
                time.sleep(rng.uniform(0.0, 0.15))
                proc.proc.send_signal(signal.SIGSTOP)
                return f"step@{max(r['step'] for r in step_records(run))}"
        elif moment == "checkpoint":
            # A folder being written by this process: one a killed run left behind is older than it.
            fresh = [p for p in root.glob(".tmp-step_*") if not p.name.endswith(".deleting")
                     and _mtime(p) >= proc.started_wall]
            if fresh:
                proc.proc.send_signal(signal.SIGSTOP)
                tmp = fresh[0]
                if tmp.is_dir() and not (root / tmp.name.removeprefix(".tmp-")).exists():
                    return f"ckpt-write@{int(tmp.name.rsplit('_', 1)[1])}"
                proc.proc.send_signal(signal.SIGCONT)  # it was published meanwhile: wait for the next one
        elif moment == "validation":
            recs = records(run)
            validated = {r["step"] for r in recs if r.get("event") == "val"}
            due = [r["step"] for r in recs if "event" not in r and r["step"] % val_every == 0
                   and r["step"] not in validated | let_go | start_steps]
            if due:
                proc.proc.send_signal(signal.SIGSTOP)
                if not any(r.get("event") == "val" and r["step"] == due[0] for r in records(run)):
                    return f"validation@{due[0]}"
                proc.proc.send_signal(signal.SIGCONT)
                let_go.add(due[0])
        time.sleep(0.0005)
    raise AssertionError(f"no '{moment}' moment within 180 s")


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def scenario_kill9_resume(data: Path, work: Path, moments=("checkpoint", "step", "validation", "checkpoint", "step"),
                          seed: int = 0) -> str:
    """`kill -9` at the given moments, one after another on one run, each restart with --resume auto."""
    rng = random.Random(seed)
    run = work / "run"
    cfg = load_config("demo", [*TINY_RUN, *KILL_RUN])  # train/main.py's default recipe
    plan = plan_stages(cfg, 1)
    total = plan.total_steps
    hits, starts = [], []
    for i, moment in enumerate([*moments, None]):
        expected = newest(run)  # what --resume auto must pick: the newest *complete* checkpoint
        if expected is not None:
            assert_complete(expected)
        start = step_of(expected)  # read now: retention may delete the folder once the run moves on
        lines_before = len(records(run))
        proc = launch(data, run, *KILL_RUN, log=work / f"launch{i}")
        if moment is None:
            code = proc.wait()
            assert code == 0, f"final run failed ({code}):\n{proc.stderr[-3000:]}"
        else:
            hits.append(_freeze_at(proc, run, moment, rng, cfg.val.every))
            proc.proc.send_signal(signal.SIGKILL)
            proc.wait(30)
            if moment == "checkpoint":
                assert list((run / "checkpoints").glob(".tmp-step_*")), "the kill left no half-written folder"
        got = resumed_from(proc.stdout)
        if expected is None:
            assert got is None, f"launch {i} resumed from {got} although no complete checkpoint existed"
        else:
            assert got == (str(expected), start), f"launch {i} resumed from {got}, expected {expected}"
        steps = [r for r in records(run)[lines_before:] if "event" not in r]
        assert [r["step"] for r in steps] == list(range(start + 1, start + 1 + len(steps))), \
            f"launch {i} (resumed at {start}) logged steps {[r['step'] for r in steps]}"
        for r in steps:
            want = lr_at(cfg.lr, cfg.optim.lr, sum(cfg.progressive.iters), (r["step"] - 1) * plan.step_scale)
            assert r["lr"] == pytest.approx(want, rel=1e-9, abs=1e-15), f"lr at step {r['step']}: {r['lr']} != {want}"
        starts.append(start)
    assert step_records(run)[-1]["step"] == total
    root = run / "checkpoints"
    assert not list(root.glob(".tmp-*")), f"stale folders left: {list(root.glob('.tmp-*'))}"
    for folder in ckpt.complete_checkpoints(root):
        assert_complete(folder)
    return (f"{len(hits)} kills ({', '.join(hits)}); restarts resumed at steps {starts[1:]} = newest complete "
            f"checkpoint each time; steps and lr continuous to {total}; no .tmp loaded, none left")


# ---------------------------------------------------------------- signals


def scenario_signal(data: Path, work: Path, sig: signal.Signals = signal.SIGUSR1) -> str:
    run = work / "run"
    proc = launch(data, run, *LONG, resume=None)
    wait_for(lambda: len(step_records(run)) >= 2, proc, "two logged steps")
    sent = time.monotonic()
    proc.proc.send_signal(sig)
    folder = wait_for(lambda: newest(run), proc, "a checkpoint after the signal", timeout=60, poll=0.02)
    saved_after = time.monotonic() - sent
    code = proc.wait(60)
    exited_after = time.monotonic() - sent
    assert code == 0, f"exit {code} after {sig.name}:\n{proc.stderr[-3000:]}"
    assert f"stopped by {sig.name}" in proc.stdout
    assert ckpt.complete_checkpoints(run / "checkpoints") == [folder]
    assert_complete(folder)
    assert step_of(folder) >= step_records(run)[-1]["step"] >= 2
    return (f"complete {folder.name} {saved_after:.1f} s after {sig.name}, exit 0 after {exited_after:.1f} s, "
            "'resume with --resume auto' printed")


# ---------------------------------------------------------------- 2-process DDP: a rank dies or hangs


def _worker_pids(launcher: int) -> dict[int, int]:
    """{rank: pid} of the processes an `accelerate launch` started (read from /proc: no psutil)."""
    ranks = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            if ppid == launcher:
                items = (stat.parent / "environ").read_bytes().split(b"\0")
                env = dict(item.split(b"=", 1) for item in items if b"=" in item)
                if b"RANK" in env:
                    ranks[int(env[b"RANK"])] = int(stat.parent.name)
    return ranks


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def scenario_ddp_rank_killed(data: Path, work: Path) -> str:
    run = work / "run"
    ddp = ["progressive.iters=[400,400]", "val.every=1000", "train.ckpt_every=2"]
    proc = launch(data, run, *ddp, resume=None, processes=2)
    before = wait_for(lambda: newest(run), proc, "a first checkpoint", timeout=180)
    ranks = wait_for(lambda: _worker_pids(proc.proc.pid) if len(_worker_pids(proc.proc.pid)) == 2 else None,
                     proc, "two ranks")
    os.kill(ranks[1], signal.SIGKILL)
    killed = time.monotonic()
    killed_code = proc.wait(120)
    stopped_after = time.monotonic() - killed
    assert killed_code != 0, "the launcher reported success although a rank was killed"
    assert _gone(ranks[0]), "rank 0 outlived its launcher"
    resume_at = newest(run)
    assert resume_at is not None and step_of(resume_at) >= step_of(before)
    assert_complete(resume_at, processes=2)
    start = step_of(resume_at)
    again = launch(data, run, *ddp, f"train.max_steps={start + 2}", processes=2)
    code = again.wait(240)
    assert code == 0, f"resume after the dead rank failed ({code}):\n{again.stderr[-3000:]}"
    assert resumed_from(again.stdout) == (str(resume_at), start)
    assert [r["step"] for r in step_records(run)][-2:] == [start + 1, start + 2]
    return (f"rank 1 killed: the launcher stopped rank 0 and exited {killed_code} after {stopped_after:.1f} s; "
            f"2-process resume from {resume_at.name} ran steps {start + 1}-{start + 2}")


def scenario_ddp_rank_hung(data: Path, work: Path, timeout_s: int = 10, launcher_reaps: bool = False) -> str:
    """Rank 1 is frozen (SIGSTOP: alive, holding its sockets, never answering): rank 0 waits in a
    collective until train.dist_timeout_s, then fails. Without `launcher_reaps` the test then kills the
    frozen rank itself, as a scheduler would, instead of waiting for the launcher's 30 s grace period."""
    run = work / "run"
    proc = launch(data, run, *LONG, f"train.dist_timeout_s={timeout_s}", resume=None, processes=2)
    wait_for(lambda: len(step_records(run)) >= 2, proc, "two logged steps", timeout=180)
    ranks = _worker_pids(proc.proc.pid)
    assert sorted(ranks) == [0, 1], ranks
    os.kill(ranks[1], signal.SIGSTOP)
    frozen = time.monotonic()
    deadline = frozen + timeout_s + 60
    while not _gone(ranks[0]) and time.monotonic() < deadline:
        time.sleep(0.1)
    rank0_after = time.monotonic() - frozen
    try:
        assert _gone(ranks[0]), f"rank 0 still waits {rank0_after:.0f} s after its peer froze ({timeout_s} s timeout)"
    finally:
        if not launcher_reaps:
            with contextlib.suppress(ProcessLookupError):
                os.kill(ranks[1], signal.SIGKILL)
    code = proc.wait(120)
    launcher_after = time.monotonic() - frozen
    assert code != 0
    assert "Timed out" in proc.stderr or "timeout" in proc.stderr.lower()
    return (f"rank 1 frozen: rank 0 failed after {rank0_after:.1f} s (dist_timeout_s={timeout_s}), launcher "
            f"exited {code} after {launcher_after:.1f} s" + ("" if launcher_reaps else " (test killed the frozen rank)"))


# ---------------------------------------------------------------- bad shards


class _Payload:
    """Unpickling this creates a folder: proof that a pickle ran code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _rewrite_shard(path: Path, change) -> None:
    """Rewrites a tar with change(members) applied to its [(name, bytes)] list."""
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]
    members = change(members)
    with tarfile.open(path, "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def damage_shards(data: Path, work: Path) -> tuple[Path, dict[str, str], Path]:
    """A copy of the train split with shard 0: a corrupt PNG, shard 1: truncated, shard 2: a target with an
    unexpected extension, an unknown extra member, and .pyd/.pickle members whose unpickling would create
    `marker`. Returns the split folder, {fault: what the log must name}, marker."""
    split = work / "bad" / "train"
    shutil.copytree(data / "train", split)
    shards = sorted(split.glob("*.tar"))
    assert len(shards) >= 4
    marker = work / "unpickled"
    evil = pickle.dumps(_Payload(marker))

    def first_target(members) -> int:
        return next(i for i, (name, _) in enumerate(members) if name.endswith(".target.png"))

    def corrupt_png(members):
        i = first_target(members)
        name, png = members[i]
        members[i] = (name, png[: len(png) // 3])
        return members

    def odd_members(members):
        i = first_target(members)
        name, png = members[i]
        members[i] = (name.replace(".target.png", ".target.gif"), png)
        other = next(n for n, _ in members if not n.startswith(name.split(".")[0] + ".")).split(".")[0]
        return members + [(f"{other}.notes.exe", b"MZ junk"), (f"{other}.pyd", evil), (f"{other}.input.pickle", evil)]

    keys = {}
    for fault, shard, change in (("corrupt PNG", shards[0], corrupt_png),
                                 ("unexpected extension", shards[2], odd_members)):
        with tarfile.open(shard) as tar:
            keys[fault] = next(n for n in tar.getnames() if n.endswith(".target.png")).split(".")[0]
        _rewrite_shard(shard, change)
    # The rewritten shards hold their samples at other byte offsets: index them as a pack that wrote
    # the bad content would have. The truncation below comes after, as it would on disk.
    index_as_packed(split)
    with tarfile.open(shards[1]) as tar:
        last = tar.getmembers()[-1]
    with open(shards[1], "r+b") as f:  # cut in the middle of the last member's data
        f.truncate(last.offset_data + last.size // 2)
    named = {"corrupt PNG": f"{shards[0].name}, key {keys['corrupt PNG']}", "truncated tar": shards[1].name,
             "unexpected extension": f"{shards[2].name}, key {keys['unexpected extension']}"}
    return split, named, marker


def index_as_packed(split: Path) -> None:
    """Rewrites a split's index to describe its shards as they are now, as the pack would have."""
    index = ShardIndex.load(split)
    shards = tuple(describe_shard(split / shard.name) for shard in index.shards)
    dataclasses.replace(index, shards=shards, total_samples=sum(s.samples for s in shards)).save(split)


def scenario_bad_shards(data: Path, work: Path, strict: bool = False) -> str:
    split, named, marker = damage_shards(data, work)
    (work / "bad" / "val").symlink_to(data / "val")
    run = work / "run"
    proc = launch(work / "bad", run, f"data.strict={str(strict).lower()}", resume=None)
    code = proc.wait(120)
    assert not marker.exists(), "a pickle member was unpickled"
    stderr = proc.stderr
    if strict:
        line = last_error_line(stderr)
        assert code == 2, f"strict mode exit {code}:\n{stderr[-3000:]}"
        assert line.startswith("error: shard ") and "strict mode" in line and "Traceback" not in stderr, line
        return f"exit 2 after {time.monotonic() - proc.started:.0f} s: {line[:200]}..."
    assert code == 0, f"exit {code}:\n{stderr[-3000:]}"
    for fault, where in named.items():
        assert re.search(rf"skipped bad sample: shard \S*{re.escape(where)}", stderr), f"{fault} ({where}) not logged"
    skipped = step_records(run)[-1]["bad_samples_skipped"]
    assert skipped > 0
    return (f"run finished (exit 0), {skipped} bad samples skipped and counted, each named in the log "
            f"({'; '.join(named.values())}); the .pyd/.pickle members never unpickled")


# ---------------------------------------------------------------- pickle payloads in a checkpoint


def scenario_checkpoint_pickle(data: Path, work: Path, base: Path, target: str) -> str:
    """`target`: a checkpoint file replaced by a torch.save'd payload, or 'init_weights' (a .pth)."""
    marker = work / f"ran-{target}"
    payload = _Payload(marker)
    torch.save(payload, work / "probe.pt")
    with contextlib.suppress(Exception):
        torch.load(work / "probe.pt", weights_only=False)  # the payload does run when unpickled ...
    assert marker.is_dir(), "the payload is not a working exploit"
    marker.rmdir()
    run = work / f"run-{target}"
    if target == "init_weights":
        torch.save(payload, work / "evil.pth")
        proc = launch(data, run, f"model.init_weights={work / 'evil.pth'}", resume=None)
    else:
        shutil.copytree(base, run)
        torch.save(payload, newest(run) / target)
        reseal(newest(run))  # an attacker who rewrites the manifest too: torch.load(weights_only=True) still refuses
        proc = launch(data, run)
    code = proc.wait(120)
    assert not marker.exists(), f"the payload in {target} ran"  # ... and the trainer never let it
    line = last_error_line(proc.stderr)
    assert code == 2, f"exit {code}:\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    wanted = "refused" if target == "init_weights" else f"{target} could not be read as plain tensors"
    assert wanted in line, line
    return f"payload not run; exit 2: {line[:200]}..."


def reseal(folder: Path) -> None:
    """Rewrites a checkpoint's manifest to match its files as they are now."""
    state = ckpt.read_state(folder)
    state.pop("manifest", None)
    ckpt.seal(folder, state)


# ---------------------------------------------------------------- damaged checkpoints, two runs on one folder


def flip_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 16):  # a damaged sector's worth, not one bit
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate_half(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


DAMAGES = {  # what is done to the newest checkpoint: (file, how)
    "bytes flipped in model.safetensors": ("model.safetensors", flip_middle),
    "model.safetensors truncated": ("model.safetensors", truncate_half),
    "bytes flipped in optimizer.bin": ("optimizer.bin", flip_middle),
    "bytes flipped in ema.safetensors": (ckpt.EMA_FILE, flip_middle),
    "bytes flipped in trainer_state.json": (ckpt.STATE_FILE, flip_middle),
}
EMA = "train.ema_decay=0.9"


def scenario_damaged_newest(data: Path, work: Path, base: Path, damage: str) -> str:
    """`base` holds step_3 and step_6 (with EMA). The damage is done to step_6: `--resume PATH` must refuse
    it naming the file, `--resume auto` must resume from step_3 and keep step_6 aside, untouched."""
    run = work / "run"
    shutil.copytree(base, run)
    older, damaged = ckpt.complete_checkpoints(run / "checkpoints")[-2:]
    name, how = DAMAGES[damage]
    how(damaged / name)
    evidence = (damaged / name).read_bytes()
    refused = launch(data, run, EMA, resume=str(damaged), log=work / "path")
    code = refused.wait(120)
    line = last_error_line(refused.stderr)
    assert code == 2 and "Traceback" not in refused.stderr, f"exit {code}:\n{refused.stderr[-3000:]}"
    assert f"refused, {name}:" in line, line
    healed = launch(data, run, EMA, log=work / "auto")
    assert healed.wait(120) == 0, healed.stderr[-3000:]
    assert resumed_from(healed.stdout) == (str(older), 3), healed.stdout[-2000:]
    note = next(l for l in healed.stderr.splitlines() if l.startswith("--resume auto: rejected"))
    assert f"rejected {damaged.name} ({name}:" in note, note
    aside = run / "checkpoints" / ckpt.REJECTED_DIR / damaged.name
    assert (aside / name).read_bytes() == evidence, "the rejected checkpoint was changed"
    assert [r["step"] for r in step_records(run)][-3:] == [4, 5, 6]
    assert ckpt.verify(newest(run)) is None and step_of(newest(run)) == 6
    return (f"--resume PATH: exit 2 `{line.split(': refused, ')[1][:90]}...`; --resume auto resumed from "
            f"{older.name}, step_6 moved to checkpoints/rejected/ unchanged, run finished")


def scenario_checkpoint_without_manifest(data: Path, work: Path, base: Path) -> str:
    """A checkpoint written before manifests existed: resumed, with a warning that it is unverified."""
    run = work / "run"
    shutil.copytree(base, run)
    folder = newest(run)
    state = ckpt.read_state(folder)
    state.pop("manifest")
    ckpt.write_json_atomic(folder / ckpt.STATE_FILE, state)
    proc = launch(data, run, log=work / "legacy")
    assert proc.wait(120) == 0, proc.stderr[-3000:]
    assert resumed_from(proc.stdout) == (str(folder), 3)
    warning = next(l for l in proc.stderr.splitlines() if "has no manifest" in l)
    assert ckpt.verify(newest(run)) is None and ckpt.is_sealed(newest(run)), "the new checkpoints carry one"
    return f"resumed, warned: `{warning.replace(str(folder), folder.name)[:110]}...`; new checkpoints sealed"


def scenario_two_runs_one_folder(data: Path, work: Path) -> str:
    """A second start on a live run's folder exits 2 naming it; once the first is killed, a third takes over."""
    run = work / "run"
    first = launch(data, run, *LONG, resume=None, log=work / "first")
    wait_for(lambda: len(step_records(run)) >= 2, first, "two logged steps")
    second = launch(data, run, *LONG, log=work / "second")
    code = second.wait(120)
    line = last_error_line(second.stderr)
    assert code == 2 and "Traceback" not in second.stderr, f"exit {code}:\n{second.stderr[-3000:]}"
    holder = f"host {socket.gethostname()}, pid {first.proc.pid}, started "
    assert "is in use by another run" in line and holder in line, line
    assert first.proc.poll() is None, f"the first run died:\n{first.stderr[-3000:]}"
    steps = [r["step"] for r in step_records(run)]
    assert steps == list(range(1, len(steps) + 1)), f"two writers in metrics.jsonl: {steps}"
    first.proc.send_signal(signal.SIGKILL)
    first.wait(30)
    third = launch(data, run, *LONG, "train.max_steps=2", log=work / "third")
    assert third.wait(120) == 0, third.stderr[-3000:]
    took = next((l for l in third.stderr.splitlines() if "took over the lock" in l), "")
    assert f"no longer alive ({holder}" in took, third.stderr[-3000:]
    return f"second start: exit 2 `{line[7:150]}...`; first run unharmed; after kill -9 of it: `{took[:110]}...`"


def scenario_damage_seen_by_one_rank(data: Path, work: Path) -> str:
    """2 processes; random_states_1.pkl of the newest checkpoint is damaged: only rank 1 reads it."""
    run = work / "run"
    base = launch(data, run, resume=None, processes=2, log=work / "base")
    assert base.wait(240) == 0, base.stderr[-3000:]
    older, damaged = ckpt.complete_checkpoints(run / "checkpoints")[-2:]
    flip_middle(damaged / "random_states_1.pkl")
    refused = launch(data, run, resume=str(damaged), processes=2, log=work / "path")
    code = refused.wait(120)
    line = next((l for l in refused.stderr.splitlines() if l.startswith("error: ")), "")
    # The launcher exits 1 when its workers fail. Every rank exits 2, but the launcher stops the
    # slower one as soon as the first exits, so its summary lists one or both. That rank 0 prints
    # rank 1's finding is what shows the ranks reached one verdict.
    assert code == 1 and refused.stderr.count("exitcode  : 2") >= 1, f"exit {code}:\n{refused.stderr[-3000:]}"
    assert "refused, rank 1: random_states_1.pkl: blake3 hash differs" in line, refused.stderr[-3000:]
    healed = launch(data, run, processes=2, log=work / "auto")
    assert healed.wait(240) == 0, healed.stderr[-3000:]
    assert resumed_from(healed.stdout) == (str(older), 3)
    assert f"rejected {damaged.name} (rank 1: random_states_1.pkl: blake3 hash differs" in healed.stderr
    assert "weights identical on every process: yes" in healed.stdout
    return (f"--resume PATH: both ranks exit 2 (launcher 1) after {time.monotonic() - refused.started:.0f} s (rank 1's "
            f"finding); --resume auto: both ranks resumed from {older.name}, in sync")


# ---------------------------------------------------------------- non-finite loss


NAN_PROBE = """
import sys
sys.path.insert(0, {root!r})
import train.step as step
import train.trainer as trainer
from train.main import main

# Runs main() unchanged, with the loss of the listed steps multiplied by NaN.
poisoned, now = {steps!r}, {{"step": 0}}
train_step, compute_losses = trainer.Trainer.train_step, step.compute_losses


def counting_step(self, stage):
    now["step"] = self.state.step + 1
    return train_step(self, stage)


def nan_losses(*args, **kwargs):
    losses = compute_losses(*args, **kwargs)
    if now["step"] in poisoned:
        losses["loss"] = losses["loss"] * float("nan")
    return losses


trainer.Trainer.train_step, step.compute_losses = counting_step, nan_losses
sys.exit(main())
"""


def scenario_nonfinite(data: Path, work: Path) -> str:
    """NaN loss at step 2 (skipped, the run goes on), then from step 5 on: stops after 3 in a row."""
    run = work / "run"
    probe = work / "nan_probe.py"
    probe.write_text(NAN_PROBE.format(root=str(ROOT), steps={2, *range(5, 100)}))
    extra = ["progressive.iters=[10,10]", "train.ckpt_every=2", "val.every=1000", "train.max_nonfinite=3",
             "train.keep_last=3"]
    proc = launch(data, run, *extra, resume=None, script=probe)
    code = proc.wait(120)
    line = last_error_line(proc.stderr)
    assert code == 3, f"exit {code}:\n{proc.stderr[-3000:]}"
    assert "3 optimizer steps in a row had a non-finite loss" in line and "last at step 7" in line, line
    assert f"last good checkpoint is {run / 'checkpoints' / 'step_00000006'}" in line, line
    steps = {r["step"]: r for r in step_records(run)}
    assert steps[3]["skipped_steps"] == 1 and steps[7]["skipped_steps"] == 4
    saved = [p.name for p in ckpt.complete_checkpoints(run / "checkpoints")]
    assert saved == ["step_00000002", "step_00000004", "step_00000006"], saved
    for folder in ckpt.complete_checkpoints(run / "checkpoints"):
        assert_complete(folder)
    at4, at6 = (read_state_dict(run / "checkpoints" / f"step_0000000{n}" / "model.safetensors") for n in (4, 6))
    assert all(torch.equal(at4[k], at6[k]) for k in at4), "a skipped step changed the weights"
    again = launch(data, run, *extra, "train.max_steps=8")
    assert again.wait(120) == 0, again.stderr[-3000:]
    assert resumed_from(again.stdout)[1] == 6
    assert [r["step"] for r in step_records(run)][-2:] == [7, 8]
    return ("step 2 skipped, run went on; steps 5-7 skipped -> exit 3 naming step_00000006; skipped steps left "
            "weights bit-identical (step 4 = step 6); resume from step_00000006 trains on")


# ---------------------------------------------------------------- disk full while saving


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def scenario_disk_full(data: Path, work: Path, base: Path, method: str = "rlimit") -> str:
    """The checkpoint after `base`'s cannot be written. rlimit: RLIMIT_FSIZE in the child (a write past
    200 kB fails with EFBIG, as on a quota); tmpfs: a real filesystem with room for one checkpoint only."""
    limit = None
    if method == "tmpfs":
        disk = work / "disk"
        disk.mkdir()
        size_kb = (_du(base) + 900_000) // 1024
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(disk)],
                                 capture_output=True, text=True)
        if mounted.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
        run = disk / "run"
    else:
        limit = 200_000
        run = work / "run"
    try:
        shutil.copytree(base, run)
        before = newest(run)

        def small_files():
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

        proc = launch(data, run, log=work / "full", preexec_fn=small_files if limit else None)
        code = proc.wait(120)
        line = last_error_line(proc.stderr)
        assert code == 2, f"exit {code}:\n{proc.stderr[-3000:]}"
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert line.startswith("error: could not write the checkpoint of step 6") and str(before) in line, line
        root = run / "checkpoints"
        assert not list(root.glob(".tmp-*")), "the half-written checkpoint was left behind"
        assert ckpt.complete_checkpoints(root) == [before]
        assert_complete(before)
        if method == "tmpfs":
            subprocess.run(["mount", "-o", f"remount,size={size_kb * 4}k", str(disk)], check=True)
        again = launch(data, run, log=work / "after")  # room again: the previous checkpoint resumes
        assert again.wait(120) == 0, again.stderr[-3000:]
        assert resumed_from(again.stdout) == (str(before), 3)
        return f"exit 2, {before.name} intact and resumed after; {line[:200]}..."
    finally:
        if method == "tmpfs":
            subprocess.run(["umount", str(work / "disk")], capture_output=True)


# ---------------------------------------------------------------- bad inputs of the config and the packer


def config_cases(data: Path, scratch: Path) -> list[tuple[list[str], str]]:
    """(train/main.py arguments, the message that must come back) for every config mistake."""
    (scratch / "broken.yaml").write_text("optim: [unclosed\n")
    (scratch / "list.yaml").write_text("- optim\n")
    (scratch / "empty").mkdir(exist_ok=True)
    (scratch / "old").mkdir(exist_ok=True)  # an index written before the per-sample records
    old_index = format1_index(data / "train", records=False)
    (scratch / "old" / "index.json").write_text(json.dumps(old_index))
    cases = [
        ("optim.lrr=1", "unknown config key 'optim.lrr'"), ("optim.lr=fast", "expected a number, got 'fast'"),
        ("train.seed=1.5", "expected an integer"), ("model.compile=maybe", "expected true/false"),
        ("progressive.iters=5", "expected a list"), ("run_name=[a]", "expected a string"),
        ("optim.lr=null", "expected a number, got None"), ("optim=3", "is a section, give a mapping"),
        ("noequals", "must look like section.key=value"), ("progressive.batch=[2]", "same, non-zero length"),
        ("progressive.iters=[0,3]", "iters and batch must be positive"),
        ("progressive.patch=[12,24]", "multiples of 8"),
        ("optim.name=adam", "optim.name='adam' is not one of: adamw, sgd"), ("lr.schedule=step", "lr.schedule='step'"),
        ("lr.warmup_iters=-1", "lr.warmup_iters must be >= 0"), ("loss.name=ssim", "loss.name='ssim'"),
        ("tracking.wandb=maybe", "tracking.wandb='maybe'"), ("data.resume=replay", "'data.resume' (from override 'data.resume=replay') was removed: resume is always exact"),
        ("train.batch_rule=scale", "train.batch_rule='scale'"),
        ("train.mixed_precision=fp8", "train.mixed_precision (from override 'train.mixed_precision=fp8'): expected no, "
                                      "bf16, fp16 or null, got 'fp8'"),
        ("data.noise_sigma_range=[0,50]", "not both"), ("data.noise_sigma=-1", "data.noise_sigma must be >= 0"),
        ("val.every=0", "val.every must be >= 1"), ("train.ema_decay=1.5", "train.ema_decay must be in (0, 1)"),
        ("optim.grad_clip=0", "optim.grad_clip must be positive"),
        ("data.num_workers=-1", "data.num_workers must be >= 0"),
        ("train.reference_world_size=0", "train.reference_world_size must be >= 1"),
        ("run_name=a/b", "without '/'"), (f"data.train={scratch}/missing", "does not exist"),
        (f"data.train={scratch}/empty", "cannot read the shard index"),
        ("data.noise_sigma=null", "holds clean images only"),
        ("progressive.patch=[16,64]", "larger than every training image"),
        (f"data.train={scratch}/old", f"run `python -m data_shards.index {scratch}/old` once"),
        ("progressive.batch=[2,1000]", "cannot fill one global batch of 1000 (1 process(es) x batch 1000) without "
                                       "repeating samples (stage 1)"),
    ]
    cases += [(f"train.{name}=0", f"train.{name} must be >= 1")
              for name in ("grad_accum", "log_every", "ckpt_every", "keep_last", "max_nonfinite")]
    argvs = [([], [override], message) for override, message in cases]  # (options, overrides, message)
    argvs += [
        ([], ["data.noise_sigma=null", "data.noise_sigma_range=[50,0]"], "give [low, high] with 0 <= low <= high"),
        ([], ["lr.schedule=restart_cosine", "lr.periods=[1]", "lr.eta_mins=[1,2]"], "lr.periods and lr.eta_mins need"),
        ([], ["lr.schedule=restart_cosine", "lr.periods=[1]", "lr.eta_mins=[1e-6]"], "schedule would run out"),
        (["--config", "no_such_recipe"], [], "not found; built-in recipes"),
        (["--config", str(scratch / "broken.yaml")], [], "not valid YAML"),
        (["--config", str(scratch / "list.yaml")], [], "top level must be a mapping"),
        (["--resume", str(scratch / "empty")], [], "not a complete checkpoint"),
    ]
    base = [f"data.train={data}/train", f"data.val={data}/val", f"output_dir={scratch}/run", *TINY_RUN]
    return [([*options, *base, *overrides], message) for options, overrides, message in argvs]


def captured(main, argv: list[str]) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of a command-line main() run in process (argparse exits included)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = main(argv)
        except SystemExit as exit_:
            code = exit_.code
    return code, out.getvalue(), err.getvalue().strip()


def run_main(argv: list[str]) -> tuple[int, str]:
    """train/main.py's main() in process: config mistakes return before any training work."""
    from train.main import main

    code, _, err = captured(main, argv)
    return code, err


def pack_cases(src: Path, scratch: Path) -> list[tuple[list[str], str]]:
    """(restormer-pack arguments, the message that must come back) for every packing mistake.
    `src` holds two RGB images."""
    def folder(name, images=(), gray=False):
        path = scratch / name
        path.mkdir(parents=True, exist_ok=True)
        for i in images:
            shape = (24, 24) if gray else (24, 24, 3)
            Image.fromarray(np.full(shape, 10 * i, np.uint8)).save(path / f"im{i}.png")
        return path

    mixed = folder("mixed", (0,))
    Image.fromarray(np.zeros((24, 24), np.uint8)).save(mixed / "gray.png")
    corrupt = folder("corrupt", (0, 1))
    (corrupt / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    one = folder("one", (0,))
    (scratch / "afile").write_text("x")
    full = folder("full")
    (full / "keep.txt").write_text("x")
    manifests = {
        "garbage.csv": "a,b\n1\n1,2,3,4\n\"unclosed",
        "no_target.csv": "input\nx.png\n",
        "no_rows.csv": "target\n",
        "bad_split.csv": f"target,split\n{src}/img0.png,Val\n",
        "split.csv": f"target,split\n{src}/img0.png,val\n{src}/img1.png,train\n",
    }
    for name, text in manifests.items():
        (scratch / name).write_text(text)
    out = ["--out", str(scratch / "out")]
    return [
        ([*out], "give exactly one source"),
        ([str(src), "--manifest", str(scratch / "split.csv"), *out], "give exactly one source"),
        (["--input", str(src), *out], "paired data needs both --input DIR and --target DIR"),
        (["--input", str(src), "--input", str(src), "--target", str(src), *out], "several inputs need distinct names"),
        (["--input", f"Left={src}", "--input", f"right={src}", "--target", str(src), *out],
         "lowercase letters and digits"),
        ([str(scratch / "afile"), *out], "not a folder"),
        ([str(folder("empty_src")), *out], "no images found"),
        (["--manifest", str(scratch / "garbage.csv"), *out], "cannot read manifest"),
        (["--manifest", str(scratch / "no_target.csv"), *out], "manifest needs a 'target' column"),
        (["--manifest", str(scratch / "no_rows.csv"), *out], "manifest has no rows"),
        (["--manifest", str(scratch / "bad_split.csv"), *out], "split 'Val' must be lowercase"),
        ([str(src), "--out", str(scratch / "afile" / "sub")], "cannot write to --out"),
        ([str(src), "--out", str(full)], "is not empty"),
        ([str(mixed), *out], "the images mix gray and colour"),
        ([str(src), "--split", "val", "--val-fraction", "0.5", *out], "--split puts every sample in one split"),
        (["--manifest", str(scratch / "split.csv"), "--val-fraction", "0.5", *out], "the manifest has a split column"),
        ([str(one), "--val-fraction", "0.5", *out], "at least two images"),
        ([str(corrupt), "--strict", *out], "bad.png: cannot decode"),
        ([str(src), "--tile", "4", *out], "--tile must be at least 8"),
        ([str(src), "--stride", "8", *out], "--stride needs --tile"),
        ([str(src), "--format", "jpg", *out], "invalid choice: 'jpg'"),
        ([str(src), "--png-level", "11", *out], "invalid choice: 11"),
        ([str(src), "--shard-samples", "0", *out], "--shard-samples must be at least 1"),
        ([str(src), "--shard-mb", "0", *out], "--shard-mb positive"),
        ([str(src), "--workers", "0", *out], "--workers must be at least 1"),
        ([str(src), "--val-fraction", "1.5", *out], "must be in [0, 1)"),
        ([str(src), "--val-fraction", "-0.1", *out], "must be in [0, 1)"),
        ([str(src)], "the following arguments are required: --out"),
    ]


def run_pack(argv: list[str]) -> tuple[int, str]:
    from data_shards.pack import main as pack_main

    code, _, err = captured(pack_main, [*argv, "--no-progress"])
    return code, err


def scenario_bad_inputs(cases, runner) -> list[tuple[list[str], int, str]]:
    """Runs every case; asserts exit 2 and the expected message. Returns (arguments, code, message line)."""
    seen, wrong = [], []
    for argv, message in cases:
        code, err = runner(argv)
        line = next((line for line in err.splitlines() if message in line), last_error_line(err))
        if code != 2 or message not in err or "Traceback" in err:
            wrong.append(f"{argv}: exit {code}, expected '{message}' in:\n{err[-1500:]}")
        seen.append((argv, code, line))
    assert not wrong, "\n\n".join(wrong)
    return seen


# ---------------------------------------------------------------- hostile data: swapped shards, lying servers, indexes, the cache


def swapped_split(work: Path) -> tuple[Path, dict[str, list[str]]]:
    """Two data sets packed alike (npy: every sample of the same byte size, the same keys in the same
    order), and ours with shard 0 replaced by theirs (the same size) and shard 1 by theirs grown by 10 KiB
    of tar padding: every byte range of the index holds a whole, valid sample of the other data set,
    which only the digests tell apart. Returns our data folder and {shard name: its keys}."""
    with contextlib.redirect_stdout(io.StringIO()):  # the packer's reports
        ours = pack_images(work / "ours", False, "--shard-samples", "2", "--format", "npy")
        theirs = pack_images(work / "theirs", True, "--shard-samples", "2", "--format", "npy")
    swapped = {}
    for shard, growth in zip(ShardIndex.load(ours / "train").shards[:2], (0, 10240), strict=True):
        replacement = (theirs / "train" / shard.name).read_bytes()
        assert len(replacement) == shard.bytes and replacement != (ours / "train" / shard.name).read_bytes()
        (ours / "train" / shard.name).write_bytes(replacement + b"\0" * growth)
        swapped[shard.name] = list(shard.keys)
    return ours, swapped


def scenario_swapped_shards(work: Path, strict: bool = False) -> str:
    data, swapped = swapped_split(work)
    run = work / "run"
    proc = launch(data, run, f"data.strict={str(strict).lower()}", resume=None)
    code = proc.wait(120)
    stderr = proc.stderr
    wrong = r"ValueError: these bytes are not the sample the index recorded \(digest differs; they hold key "
    if strict:
        line = last_error_line(stderr)
        assert code == 2, f"strict mode exit {code}:\n{stderr[-3000:]}"
        assert re.match(rf"error: shard \S+/train-00000[01]\.tar bytes \d+:\d+, key img\d+: {wrong}", line), line
        assert "Traceback" not in stderr
        return f"exit 2 after {time.monotonic() - proc.started:.0f} s: {line[:200]}..."
    assert code == 0, f"exit {code}:\n{stderr[-3000:]}"
    for name, keys in swapped.items():
        for key in keys:
            assert re.search(rf"skipped bad sample: shard \S*{name} bytes \d+:\d+, key {key}: {wrong}{key}\)", stderr), \
                f"{name} key {key} not named"
    skipped = step_records(run)[-1]["bad_samples_skipped"]
    assert skipped >= 4
    line = next(line for line in stderr.splitlines() if "skipped bad sample" in line)
    return (f"run finished (exit 0), {skipped} bad samples skipped and counted; each of the 4 swapped samples named, "
            f"e.g. `{line[line.index('shard '):][:200]}...`")


LIES = {"from_zero": "206 with bytes from 0", "wider": "206 with a wider range", "no_content_range": "206 without Content-Range",
        "ignore_range": "200 with the whole file"}


def scenario_lying_server(data: Path, work: Path, lie: str) -> str:
    """The train split served over a loopback http server that answers the Range requests for one shard
    (train-000001.tar) with other bytes than asked for (`lie`, see LIES)."""
    files = {f"/train/{path.name}": path.read_bytes() for path in (data / "train").iterdir()}
    liar = "/train/train-000001.tar"
    with loopback_http(files) as server:
        if lie == "ignore_range":
            server.plan.ignore_range = True
        else:
            server.plan.lie, server.plan.lie_paths = lie, {liar}
        url = f"http://127.0.0.1:{server.server_address[1]}/train/index.json"
        run = work / "run"
        proc = launch(data, run, f"data.train={url}", "data.retries=1", resume=None)
        code = proc.wait(180)
    stderr = proc.stderr
    assert code == 0, f"exit {code}:\n{stderr[-3000:]}"
    assert "these bytes are not the sample" not in stderr  # refused at the range check, before any digest
    skipped = step_records(run)[-1]["bad_samples_skipped"]
    if lie == "ignore_range":
        assert skipped == 0 and "skipped bad sample" not in stderr, stderr[-3000:]
        return "run finished (exit 0), 0 bad samples: the head of each whole-file answer was discarded, the range kept"
    line = next((line for line in stderr.splitlines() if "skipped bad sample" in line), "")
    assert skipped > 0 and re.search(rf"{liar} bytes \d+:\d+: ShardReadError: gave up at byte \d+ after 1 retries: asked "
                                     r"for bytes \d+-\d+, the (server sent|answer has)", line), stderr[-3000:]
    return f"run finished (exit 0), {skipped} bad samples skipped and counted: `{line[line.index('shard '):][:200]}...`"


def hostile_indexes(data: Path, scratch: Path) -> list[tuple[Path, str]]:
    """Split folders whose index.json is hostile, each with the message its refusal must carry. The
    per-sample cases edit an index of format 1 (records as JSON lists, still read); the records file's
    own hostile cases are in tests/test_index.py."""
    good = format1_index(data / "train")

    def edited(change) -> str:
        index = json.loads(json.dumps(good))
        change(index)
        return json.dumps(index)

    def shard0(field, value):
        return lambda index: index["shards"][0].__setitem__(field, value)

    def sample_over_limit(index):  # shard 0's last sample one byte longer than the largest pack writes
        offsets = index["shards"][0]["offsets"]
        offsets[-1] = offsets[-2] + MAX_SAMPLE_BYTES + 1
        index["shards"][0]["bytes"] = offsets[-1]

    cases = {
        "list": ("[1, 2]", "the top level is a list of 2 items, not an object"),
        "null": ("null", "the top level is null, not an object"),
        "no_shards": (edited(lambda index: index.pop("shards")), "missing shards"),
        "unknown_field": (edited(lambda index: index.update(evil=1)), "unknown evil"),
        "version": (edited(lambda index: index.update(format_version=99)), "index format_version an integer 99"),
        "shards_object": (edited(lambda index: index.update(shards={})), "shards must be a list, got an object"),
        "string_count": (edited(lambda index: index.update(total_samples="8")), "total_samples must be an integer >= 0"),
        "nan_samples": (edited(shard0("samples", float("nan"))), "shards[0].samples must be an integer >= 0, got a number NaN"),
        "negative_size": (edited(shard0("bytes", -5)), "shards[0].bytes must be an integer >= 0, got an integer -5"),
        "offset_1e12": (edited(lambda index: index["shards"][0]["offsets"].__setitem__(-1, 10**12)),
                        "spans bytes"),
        "past_the_end": (edited(shard0("bytes", 100)), "past the shard's 100 bytes"),
        "short_keys": (edited(lambda index: index["shards"][0]["keys"].pop()), "shards[0].keys must be a list of 2 items, got a list of 1 item"),
        "bad_digest": (edited(lambda index: index["shards"][0]["blake3"].__setitem__(0, "zz")), "of 32 hex digits"),
        "sample_over_limit": (edited(sample_over_limit), f"a sample takes 1 to {MAX_SAMPLE_BYTES} bytes"),
        "escape_key": (edited(lambda index: index["shards"][0]["keys"].__setitem__(0, "\x1b[2J")),
                       'shards[0].keys[0] must be printable text of 1 to 255 characters, got a string "\\u001b[2J"'),
        "long_key": (edited(lambda index: index["shards"][0]["keys"].__setitem__(1, "k" * 256)),
                     "shards[0].keys[1] must be printable text of 1 to 255 characters"),
        "split_newline": (edited(lambda index: index.update(split="train\nfake")), "split must be printable text"),
        "command_escape": (edited(lambda index: index.update(command="\x1b]0;owned\x07")),
                           "command must be printable text of any length"),
        "deep": ("[" * 100_000, "not a valid shard index (RecursionError"),
        "many_digits": ('{"a": 1' + "0" * 5000 + "}", "not a valid shard index (ValueError: Exceeds the limit"),
        "binary": (b"\xff\xfe\x00garbage", "not UTF-8"),
        "huge": (None, "more than any shard index"),
    }
    folders = []
    for name, (content, message) in cases.items():
        folder = scratch / "indexes" / name
        folder.mkdir(parents=True)
        path = folder / "index.json"
        if content is None:  # sparse: a file of 1 GiB + 1 byte that takes no disk
            with open(path, "wb") as handle:
                handle.truncate(MAX_INDEX_BYTES + 1)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        folders.append((folder, message))
    return folders


def escaping_indexes(data: Path, scratch: Path) -> list[tuple[Path, str]]:
    """Split folders whose index lists a shard twice or names one outside the split's folder."""
    good = json.loads((data / "train" / "index.json").read_text(encoding="utf-8"))
    names = {"dotdot": "../val/val-000000.tar", "absolute": "/etc/passwd", "inner_dotdot": "sub/../../val/x.tar",
             "backslash": "..\\val\\x.tar", "url": "http://elsewhere/x.tar", "hidden": ".hidden.tar"}
    folders = []
    for case, name in names.items():
        index = json.loads(json.dumps(good))
        index["shards"][0]["name"] = name
        folders.append((case, index, f"shard name {json.dumps(name)} is not allowed"))
    twice = json.loads(json.dumps(good))
    twice["shards"][1] = twice["shards"][0]
    folders.append(("twice", twice, f"shards[1] '{good['shards'][0]['name']}' is listed twice (also shards[0])"))
    made = []
    for case, index, message in folders:
        folder = scratch / "escaping" / case
        folder.mkdir(parents=True)
        (folder / "index.json").write_text(json.dumps(index), encoding="utf-8")
        made.append((folder, message))
    return made


def run_index_tool(argv: list[str]) -> tuple[int, str]:
    from data_shards.index import main as index_main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = index_main(argv)
    return code, err.getvalue().strip()


def scenario_bad_indexes(data: Path, folders: list[tuple[Path, str]], scratch: Path) -> list[tuple[list[str], int, str]]:
    """Each index given as data.train to train/main.py and to `python -m data_shards.index`: exit 2 with
    its one-line message, no traceback; `restormer-verify` reports it (exit 1)."""
    from data_shards.verify import main as verify_main

    base = [f"data.val={data}/val", f"output_dir={scratch}/run", *TINY_RUN]
    seen = scenario_bad_inputs([([*base, f"data.train={folder}"], message) for folder, message in folders], run_main)
    scenario_bad_inputs([([str(folder)], message) for folder, message in folders], run_index_tool)
    for folder, message in folders:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert verify_main([str(folder)]) == 1
        assert f"cannot read {'index.json'}" in out.getvalue() and message in out.getvalue(), out.getvalue()
    return [([a for a in argv if a not in base], code, line) for argv, code, line in seen]


def scenario_cache_in_run_folder(data: Path, scratch: Path) -> list[tuple[list[str], int, str]]:
    """data.cache_dir that is the run folder, lies inside it or holds it: refused before any work, and the
    run folder's files (a live run's lock and config) untouched."""
    run = scratch / "runs" / "live"
    run.mkdir(parents=True)
    files = {run / "run.lock": b"host vm pid 1", run / "config.yaml": b"run_name: live\n"}
    for path, content in files.items():
        path.write_bytes(content)
    base = [f"data.train={data}/train", f"data.val={data}/val", f"output_dir={run}", *TINY_RUN, "data.cache_limit_gb=1"]
    cases = [(f"data.cache_dir={run}", "is the run folder"), (f"data.cache_dir={run}/cache", "is inside the run folder"),
             (f"data.cache_dir={run.parent}", "holds the run folder")]
    seen = scenario_bad_inputs([([*base, override], message) for override, message in cases], run_main)
    assert all(path.read_bytes() == content for path, content in files.items())
    assert sorted(run.iterdir()) == sorted(files)
    return [([a for a in argv if a not in base], code, line) for argv, code, line in seen]


def scenario_foreign_files_in_cache(data: Path, work: Path) -> str:
    """A run reading its shards over loopback http through a cache whose folder holds other files, with a
    limit of 2.5 shards (4 shards are read, so copies are evicted): only the cache's copies are deleted."""
    cache = work / "cache"
    own = cache / CACHE_SUBFOLDER
    own.mkdir(parents=True)
    index = ShardIndex.load(data / "train")
    foreign = {cache / "run.lock": b"host vm pid 1", cache / "config.yaml": b"run_name: other\n",
               cache / "old-shard.tar": b"\0" * 4 * max(s.bytes for s in index.shards), own / "notes.txt": b"mine"}
    for path, content in foreign.items():
        path.write_bytes(content)
        os.utime(path, (1, 1))  # older than any copy: first in line for a cache that deleted by age alone
    files = {f"/train/{path.name}": path.read_bytes() for path in (data / "train").iterdir()}
    limit = 2.5 * max(s.bytes for s in index.shards)
    with loopback_http(files) as server:
        url = f"http://127.0.0.1:{server.server_address[1]}/train/index.json"
        proc = launch(data, work / "run", f"data.train={url}", f"data.cache_dir={cache}",
                      f"data.cache_limit_gb={limit / 1e9}", resume=None)
        code = proc.wait(180)
        fetched = sorted({path for path, _, _ in server.plan.requests if path.endswith(".tar")})
    assert code == 0, f"exit {code}:\n{proc.stderr[-3000:]}"
    untouched = [path for path, content in foreign.items() if path.exists() and path.read_bytes() == content]
    assert len(untouched) == len(foreign), f"foreign files lost: {sorted(set(foreign) - set(untouched))}"
    listed = (own / ShardCache.MANIFEST).read_text(encoding="utf-8").split()
    copies = sorted(p.name for p in own.iterdir() if not p.name.startswith(".") and p not in foreign
                    and p.name != ShardCache.MANIFEST)
    assert copies == sorted(listed) and len(fetched) == 4 and len(copies) < 4
    assert sum((own / name).stat().st_size for name in copies) <= limit
    return (f"run finished (exit 0): 4 shards fetched, {4 - len(copies)} evicted, {len(copies)} copies kept (all in the "
            f"manifest, within the {limit / 1e3:.0f} kB limit); the 4 foreign files (run.lock, config.yaml, a 4-shard "
            ".tar, one in the cache's own subfolder) untouched")


# ---------------------------------------------------------------- hostile inputs: image bombs, YAML


BOMBS = {"PNG": ("png8_bomb.png", 8), "16-bit PNG": ("png16_bomb.png", 16), "TIFF": ("tiff_bomb.tif", 8),
         "npy": ("npy_bomb.npy", 8)}
BOMB_SIDE = 14000  # 196 MP, over data_shards.codec.MAX_PIXELS: issue 28's TIFF that killed tools.restore


def bomb_folder(folder: Path) -> list[Path]:
    """Two good RGB images and one bomb of each kind: a few hundred bytes whose header claims BOMB_SIDE^2."""
    folder.mkdir(parents=True)
    for i in range(2):
        Image.fromarray(np.full((24, 24, 3), 40 * i, np.uint8)).save(folder / f"good{i}.png")
    return [image_bomb(folder / name, BOMB_SIDE, BOMB_SIDE, bits) for name, bits in BOMBS.values()]


def scenario_image_bombs_pack(work: Path) -> str:
    """Pack skips and lists every bomb (the good images are packed); --strict stops at the first, exit 2."""
    from data_shards.pack import main as pack_main

    bombs = bomb_folder(work / "src")
    started = time.perf_counter()
    code, out, err = captured(pack_main, [str(work / "src"), "--out", str(work / "out"), "--color", "rgb",
                                          "--no-progress"])
    seconds = time.perf_counter() - started
    assert code == 0 and "Traceback" not in err, f"exit {code}:\n{err[-2000:]}"
    listed = [line.strip() for line in out.splitlines() if "pixels, over the limit" in line]
    assert sorted(line.split(":")[0] for line in listed) == sorted(map(str, bombs)), out
    assert "packed 2 samples from 6 images" in out, out
    code, _, err = captured(pack_main, [str(work / "src"), "--out", str(work / "strict"), "--color", "rgb",
                                        "--strict", "--no-progress"])
    assert code == 2 and len(err.splitlines()) == 1 and "over the limit" in err, err
    return (f"exit 0 in {seconds:.1f} s, the 2 good images packed, the {len(bombs)} bombs listed as skipped "
            f"(`{listed[0].replace(str(work), '<work>')[:120]}...`); --strict: exit 2, one line naming the first")


def scenario_image_bombs_restore(work: Path) -> str:
    """tools.restore names every bomb, restores the good images around them and exits 1."""
    from model import save_safetensors
    from tools.restore import main as restore_main

    bombs = bomb_folder(work / "src")
    weights = work / "tiny.safetensors"
    save_safetensors(tiny_net(), weights)
    started = time.perf_counter()
    code, out, err = captured(restore_main, [str(work / "src"), "-w", str(weights), "--preset", "default",
                                             *TINY_NET_ARGS, "-o", str(work / "out")])
    seconds = time.perf_counter() - started
    assert code == 1 and "Traceback" not in err, f"exit {code}:\n{err[-2000:]}"
    named = [line for line in err.splitlines() if line.startswith("skipped: ") and "over the limit" in line]
    assert len(named) == len(bombs), err
    assert sorted(p.name for p in (work / "out").iterdir()) == ["good0.png", "good1.png"]
    return (f"exit 1 in {seconds:.1f} s: the 2 good images restored, the {len(bombs)} bombs skipped and named "
            f"(`{named[0].replace(str(work), '<work>')[:110]}...`)")


def alias_bomb(levels: int = 9, fan: int = 9) -> str:
    """YAML of about 400 bytes whose aliases expand to fan**levels values ("billion laughs")."""
    lines = ["l0: &l0 [" + ", ".join(["lol"] * fan) + "]"]
    lines += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * fan) + "]" for i in range(1, levels)]
    return "\n".join(lines) + f"\noptim: {{lr: *l{levels - 1}}}\n"


def hostile_config_cases(scratch: Path) -> list[tuple[list[str], str]]:
    """(train/main.py arguments, the message that must come back) for hostile config files and overrides.
    --print-config: a case that is wrongly accepted returns at once instead of training."""
    files = {"deep.yaml": ("a: " + "[" * 20000 + "]" * 20000 + "\n").encode(), "binary.yaml": bytes(range(256)) * 4,
             "bomb.yaml": alias_bomb().encode(), "huge.yaml": b"# padding\n" * 200_000}
    for name, data in files.items():
        (scratch / name).write_bytes(data)
    cases = [(["--config", str(scratch / name)], message) for name, message in (
        ("deep.yaml", "refused: nested deeper than 32 levels"), ("binary.yaml", "not a text file (byte 0x80"),
        ("bomb.yaml", "more than 10,000 values once aliases are expanded"), ("huge.yaml", "larger than the 1,048,576"))]
    cases += [([override], message) for override, message in (
        ("optim.lr={a: [1,", "not valid YAML: while parsing a flow node"),
        ("optim.lr=" + "[" * 20000, "refused: nested deeper than 32 levels"),
        ("optim.betas=&a [1, *a]", "recursive alias"), ("run_name=a\x00b", "unacceptable character #x0000"),
        ("optim.lr=!!python/object/apply:os.system ['true']", "could not determine a constructor"),
        ("train.seed=" + "1" * 5000, "Exceeds the limit (4300 digits)"),
        ("optim.lr=.nan", "optim.lr=nan: numbers in a config are finite"), ("train.seed=-1", "train.seed=-1: numbers"),
        ("train.dist_timeout_s=99999999999999999999", "integers below 2**31"),
        ("train.seed=" + "9" * 400, "train.seed=999999999999...9999 (400 digits): numbers in a config are finite"),
        ("optim.lr=0x" + "f" * 400, "optim.lr (from override 'optim.lr=0xfff"),
        ("train.memory_gb=0x" + "f" * 400, "444624164770...5375 (482 digits) is too large for a number"),
        ("data.num_workers=100000", "data.num_workers=100000 is outside [0, 256]"),
        ("optim.betas=[2, 3]", "optim.betas[0]=2.0 is outside"))]
    return [(["--print-config", *options], message) for options, message in cases]


def scenario_hostile_configs(scratch: Path) -> tuple[str, list[tuple[list[str], int, str]]]:
    """Every case of hostile_config_cases exits 2 with one line; returns the row's text and the messages."""
    seconds = []

    def timed(argv: list[str]) -> tuple[int, str]:
        started = time.perf_counter()
        code, err = run_main(argv)
        seconds.append(time.perf_counter() - started)
        assert len(err.splitlines()) <= 1, f"{argv[:3]}: more than one line:\n{err[:2000]}"
        return code, err

    seen = scenario_bad_inputs(hostile_config_cases(scratch), timed)
    bomb = next(t for (argv, _, _), t in zip(seen, seconds) if argv[-1].endswith("bomb.yaml"))
    return (f"{len(seen)} cases: each exits 2 with one line, no traceback; the slowest refused in "
            f"{max(seconds) * 1000:.0f} ms, the alias bomb in {bomb * 1000:.0f} ms (listed below)"), seen


# ---------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("faults"))


@pytest.fixture(scope="module")
def base_run(data, tmp_path_factory) -> Path:
    """A run stopped at step 3 of 6 with one checkpoint: what the checkpoint-file faults start from."""
    run = tmp_path_factory.mktemp("base") / "run"
    proc = launch(data, run, "train.max_steps=3", resume=None)
    assert proc.wait() == 0, proc.stderr[-3000:]
    assert [p.name for p in ckpt.complete_checkpoints(run / "checkpoints")] == ["step_00000003"]
    return run


@pytest.fixture(scope="module")
def two_checkpoints(data, tmp_path_factory) -> Path:
    """A finished run with EMA: step_3 and step_6."""
    run = tmp_path_factory.mktemp("two") / "run"
    proc = launch(data, run, EMA, resume=None)
    assert proc.wait() == 0, proc.stderr[-3000:]
    assert [p.name for p in ckpt.complete_checkpoints(run / "checkpoints")] == ["step_00000003", "step_00000006"]
    return run


def test_an_ema_run_exports_the_trained_and_the_ema_weights(two_checkpoints):
    official = torch.load(two_checkpoints / "export" / "model_official.pth", weights_only=True)
    assert set(official) == {"params", "params_ema"}
    last = ckpt.complete_checkpoints(two_checkpoints / "checkpoints")[-1]
    for key, file in (("params", ckpt.MODEL_FILE), ("params_ema", ckpt.EMA_FILE)):
        saved = read_state_dict(last / file)
        assert all(torch.equal(official[key][k], v) for k, v in saved.items()), key
    deployed = read_state_dict(two_checkpoints / "export" / "model.safetensors")
    assert all(torch.equal(official["params_ema"][k], v) for k, v in deployed.items())
    assert not all(torch.equal(official["params"][k], v) for k, v in deployed.items())
    assert "preset" in yaml.safe_load((two_checkpoints / "export" / "config.yaml").read_text())["model"]


@pytest.mark.parametrize("damage", ["bytes flipped in model.safetensors", "model.safetensors truncated"])
def test_a_damaged_newest_checkpoint_is_refused_by_path_and_passed_over_by_auto(data, two_checkpoints, tmp_path,
                                                                                damage):
    scenario_damaged_newest(data, tmp_path, two_checkpoints, damage)


def test_a_checkpoint_without_manifest_resumes_with_a_warning(data, base_run, tmp_path):
    scenario_checkpoint_without_manifest(data, tmp_path, base_run)


def test_a_second_run_on_a_live_folder_exits_2_and_a_dead_ones_lock_is_taken_over(data, tmp_path):
    scenario_two_runs_one_folder(data, tmp_path)


@pytest.mark.slow
def test_damage_only_one_rank_sees_stops_both_and_auto_heals_on_both(data, tmp_path):
    scenario_damage_seen_by_one_rank(data, tmp_path)


@pytest.mark.slow
def test_kill9_five_times_resumes_from_the_newest_complete_checkpoint(data, tmp_path):
    scenario_kill9_resume(data, tmp_path)


def test_retention_killed_midway_leaves_no_checkpoint_that_looks_complete(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        folder = root / ckpt.checkpoint_name(step)
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"weights")
        (folder / ckpt.STATE_FILE).write_text("{}")

    def killed_midway(path, ignore_errors=False):  # deletes one file, then the process dies
        if Path(path).exists():
            (Path(path) / "model.safetensors").unlink()
            raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        ckpt.prune(root, keep_last=2, keep=set())
    monkeypatch.undo()
    assert [p.name for p in ckpt.complete_checkpoints(root)] == ["step_00000002", "step_00000003"]
    ckpt.clean_stale_tmp(root)  # what the next save does first
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002", "step_00000003"]


def test_sigusr1_writes_a_complete_checkpoint_and_exits_cleanly(data, tmp_path):
    scenario_signal(data, tmp_path, signal.SIGUSR1)


@pytest.mark.slow
def test_ddp_rank_killed_stops_the_other_and_resume_works(data, tmp_path):
    scenario_ddp_rank_killed(data, tmp_path)


@pytest.mark.slow
def test_ddp_frozen_rank_fails_the_other_after_dist_timeout(data, tmp_path):
    scenario_ddp_rank_hung(data, tmp_path, timeout_s=10)


@pytest.mark.parametrize("strict", [False, True], ids=["skip", "strict"])
def test_bad_shards_are_skipped_and_named_or_stop_strict_mode(data, tmp_path, strict):
    scenario_bad_shards(data, tmp_path, strict)


@pytest.mark.parametrize("target", ["optimizer.bin", "random_states_0.pkl", "init_weights"])
def test_pickle_payload_in_a_checkpoint_never_runs(data, base_run, tmp_path, target):
    scenario_checkpoint_pickle(data, tmp_path, base_run, target)


def test_nonfinite_losses_are_skipped_then_stop_with_the_last_good_checkpoint(data, tmp_path):
    scenario_nonfinite(data, tmp_path)


def test_disk_full_while_saving_keeps_the_previous_checkpoint(data, base_run, tmp_path):
    scenario_disk_full(data, tmp_path, base_run, "rlimit")


def test_every_config_mistake_has_its_message(data, tmp_path):
    scenario_bad_inputs(config_cases(data, tmp_path), run_main)


def test_every_pack_mistake_has_its_message(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(2):
        Image.fromarray(np.full((24, 24, 3), 40 * i, np.uint8)).save(src / f"img{i}.png")
    scenario_bad_inputs(pack_cases(src, tmp_path), run_pack)


@pytest.mark.parametrize("strict", [False, True], ids=["skip", "strict"])
def test_swapped_shards_are_named_sample_by_sample_or_stop_strict_mode(tmp_path, strict):
    scenario_swapped_shards(tmp_path, strict)


def test_a_lying_http_server_is_retried_then_its_shard_skipped_and_named(data, tmp_path):
    scenario_lying_server(data, tmp_path, "from_zero")


def test_hostile_and_escaping_indexes_exit_2_with_one_line(data, tmp_path):
    scenario_bad_indexes(data, hostile_indexes(data, tmp_path) + escaping_indexes(data, tmp_path), tmp_path)


def test_a_cache_folder_that_is_holds_or_lies_in_the_run_folder_is_refused(data, tmp_path):
    scenario_cache_in_run_folder(data, tmp_path)


def test_the_cache_evicts_only_its_own_copies(data, tmp_path):
    scenario_foreign_files_in_cache(data, tmp_path)


def test_image_bombs_are_skipped_and_listed_by_pack_and_named_by_restore(tmp_path):
    scenario_image_bombs_pack(tmp_path / "pack")
    scenario_image_bombs_restore(tmp_path / "restore")


def test_hostile_config_files_and_overrides_exit_2_with_one_line(tmp_path):
    scenario_hostile_configs(tmp_path)
