"""One run per run folder: a lock file the main process holds for the whole run.

`<run folder>/run.lock` carries its holder (host, pid, the process's start time) and is held with
flock(2) while the run lives; a background thread touches it every HEARTBEAT_S seconds.

What a second start on the same folder sees:
- the flock is held (a live run on this host, or on any host where the file system makes flock
  cluster-wide: NFSv4, GPFS, Lustre mounted with `-o flock`): refused, naming the holder;
- the flock is free and the file names a process on this host that no longer runs (or whose pid
  now belongs to another process): taken over, with a message;
- the flock is free and the file names another host: on file systems whose flock is cluster-wide
  the holder is gone, but some (NFSv3 without lockd, Lustre with `-o localflock`) only lock per
  node, so the heartbeat decides: a holder seen within STALE_S seconds is taken as alive (refused),
  an older one as dead (taken over, with a message).

Not guaranteed: on a file system without cluster-wide flock, two starts on different hosts within
the same fraction of a second can both win, a holder frozen for longer than STALE_S (SIGSTOP, a
hung node) loses its lock, and the heartbeat age is measured against this host's clock (skewed
clocks shift STALE_S). An empty lock file means no holder: the lock is released by emptying it, never
by deleting it (another process may hold the deleted file open and locked).
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

LOCK_FILE = "run.lock"
HEARTBEAT_S = 30.0
STALE_S = 120.0


class RunLockedError(RuntimeError):
    pass


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    started: str  # ISO time the holding run started, for people
    proc_start: str | None  # the process's start time from /proc: tells a reused pid apart

    def describe(self) -> str:
        return f"host {self.host}, pid {self.pid}, started {self.started}"


def _proc_start(pid: int) -> str | None:
    """Start time of a process in clock ticks since boot (Linux), None where /proc cannot tell."""
    try:
        return Path(f"/proc/{pid}/stat").read_text(encoding="utf-8").rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive_here(holder: Holder) -> bool:
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process with that pid
        pass
    now = _proc_start(holder.pid)
    return holder.proc_start is None or now is None or now == holder.proc_start


def _read_holder(fd: int) -> Holder | None:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 65536)
    if not raw.strip():
        return None
    try:
        data = json.loads(raw)
        return Holder(str(data["host"]), int(data["pid"]), str(data["started"]), data.get("proc_start"))
    except (ValueError, KeyError, TypeError):
        return Holder("unknown", -1, "unknown", None)  # garbage: treated as a holder nobody can vouch for


class RunLock:
    """`acquire()` or RunLockedError; `release()` at the end of the run. Main process only."""

    def __init__(self, run_dir: Path, stale_s: float = STALE_S, heartbeat_s: float = HEARTBEAT_S):
        self.path = Path(run_dir) / LOCK_FILE
        self.stale_s = stale_s
        self.heartbeat_s = heartbeat_s
        self._fd: int | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def acquire(self) -> str | None:
        """Takes the lock. Returns a note when a dead holder's lock was taken over, else None."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            note = self._claim(fd)
        except BaseException:
            os.close(fd)
            raise
        me = Holder(socket.gethostname(), os.getpid(),
                    datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    _proc_start(os.getpid()))
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(vars(me)).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        self._beat = threading.Thread(target=self._heartbeat, name="run-lock-heartbeat", daemon=True)
        self._beat.start()
        return note

    def _claim(self, fd: int) -> str | None:
        flocked = True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                flocked = False  # a file system without flock (ENOLCK, EOPNOTSUPP): the file decides alone
            else:
                holder = _read_holder(fd)
                who = holder.describe() if holder else "a process that has not written its name yet"
                if holder is not None and holder.host == socket.gethostname() and not _alive_here(holder):
                    # Forked children (data-loader workers) share the lock until they notice their parent died.
                    who += "; that process is gone but one it forked still holds the lock: retry in a few seconds"
                raise RunLockedError(self._refusal(who)) from None
        holder = _read_holder(fd)
        if holder is None:
            return None
        if holder.host == socket.gethostname():
            if flocked or not _alive_here(holder):
                return f"took over the lock of a run that is no longer alive ({holder.describe()})"
            raise RunLockedError(self._refusal(holder.describe()))
        age = time.time() - os.fstat(fd).st_mtime
        if age < self.stale_s:
            raise RunLockedError(self._refusal(f"{holder.describe()}; last heartbeat {age:.0f} s ago"))
        return (f"took over the lock of {holder.describe()}: no heartbeat for {age:.0f} s "
                f"(> {self.stale_s:.0f} s), so that run is taken as dead")

    def _refusal(self, who: str) -> str:
        return (f"run folder {self.path.parent} is in use by another run ({who}). One run per folder: wait for "
                f"it to end, stop it, or give this run another output_dir/run_name. If that run is dead on "
                f"another host, its lock is taken over {self.stale_s:.0f} s after its last heartbeat")

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self.path)
            except OSError:  # a transient file-system error: the next beat tries again
                pass

    def release(self) -> None:
        if self._fd is None:
            return
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        try:
            os.ftruncate(self._fd, 0)
        finally:
            os.close(self._fd)  # closing drops the flock
            self._fd = None
