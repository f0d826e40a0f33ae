"""Fault injection: what a crash, a preemption, a dead rank or a bad file costs a training run.

Each `scenario_*` function injects one fault into real `train/main.py` processes (or runs the packer
and the config in process), asserts what must survive it and returns one line saying what it
observed. The tests below call them; `benchmarks/faults.py` runs them all and prints the table that
docs/reliability.md explains.
"""

from __future__ import annotations

import contextlib
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

from conftest import ROOT, TINY_RUN, accelerate_cmd, child_env, pack_images, records
from model import read_state_dict
from data_shards.index import add_offsets
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
    add_offsets(split)
    with tarfile.open(shards[1]) as tar:
        last = tar.getmembers()[-1]
    with open(shards[1], "r+b") as f:  # cut in the middle of the last member's data
        f.truncate(last.offset_data + last.size // 2)
    named = {"corrupt PNG": f"{shards[0].name}, key {keys['corrupt PNG']}", "truncated tar": shards[1].name,
             "unexpected extension": f"{shards[2].name}, key {keys['unexpected extension']}"}
    return split, named, marker


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
import train.trainer as trainer
from train.main import main

# Runs main() unchanged, with the loss of the listed steps multiplied by NaN.
poisoned, now = {steps!r}, {{"step": 0}}
train_step, compute_losses = trainer.Trainer.train_step, trainer.compute_losses


def counting_step(self, stage):
    now["step"] = self.state.step + 1
    return train_step(self, stage)


def nan_losses(*args, **kwargs):
    losses = compute_losses(*args, **kwargs)
    if now["step"] in poisoned:
        losses["loss"] = losses["loss"] * float("nan")
    return losses


trainer.Trainer.train_step, trainer.compute_losses = counting_step, nan_losses
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
    (scratch / "old").mkdir(exist_ok=True)  # an index written before sample offsets were recorded
    old_index = json.loads((data / "train" / "index.json").read_text())
    for shard in old_index["shards"]:
        del shard["offsets"]
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
        ("train.mixed_precision=fp8", "train.mixed_precision='fp8'"),
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
        ("progressive.batch=[2,1000]", "fewer than one micro-batch of stage 1 across all processes (1 process(es) x batch 1000 = 1000)"),
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


def run_main(argv: list[str]) -> tuple[int, str]:
    """train/main.py's main() in process: config mistakes return before any training work."""
    from train.main import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    return code, err.getvalue().strip()


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

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = pack_main([*argv, "--no-progress"])
        except SystemExit as exit_:  # argparse errors
            code = exit_.code
    return code, err.getvalue().strip()


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
