"""One copy per node of a remote index's records file, fetched by one process while the others wait.

The records of 10^8 samples take gigabytes; every rank of a node reading them from object storage at
the same moment would fetch them once per rank. Instead the first process to need them takes a
lock file in the node's folder (flock: the kernel releases it if that process dies), downloads to a
temporary name, checks the BLAKE3 hash that index.json records, and renames the copy into place;
the processes that waited on the lock find the finished copy and only map it. Copies are named by
that hash, so a copy can never stand for other records than the index names, and a re-uploaded
pack gets a new copy. Each process still checks the copy when it opens it (data_shards.records).

The folder is settings.cache_dir/CACHE_SUBFOLDER when the run has a shard cache, else a folder of
this user's own in the system's temporary folder. Without working flock (some network file systems)
every process downloads; the rename still keeps each copy whole.
"""

from __future__ import annotations

import errno
import fcntl
import os
import tempfile
from pathlib import Path

import blake3

from data_shards.atomic import atomic_write
from data_shards.remote import RemoteSettings, open_uncached, redact

CACHE_SUBFOLDER = "restormer-index-cache"
_CHUNK = 1 << 22


def node_folder(settings: RemoteSettings) -> Path:
    """Where this node keeps records copies: beside the shard cache, or a private temporary folder."""
    if settings.cache_dir is not None:
        return Path(settings.cache_dir) / CACHE_SUBFOLDER
    return Path(tempfile.gettempdir()) / f"{CACHE_SUBFOLDER}-{os.getuid()}"


def node_copy(url: str, size: int, hexdigest: str, settings: RemoteSettings) -> Path:
    """The path of the node's copy of the records file at `url` (`size` bytes, BLAKE3 `hexdigest`),
    downloading it first unless this node already has it."""
    folder = node_folder(settings)
    path = folder / f"{hexdigest}.records"
    if _whole(path, size):
        return path
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    if folder.is_symlink() or folder.stat().st_uid != os.getuid():
        raise ValueError(f"{folder}: not a folder of this user's own (a link, or owned by another user), so it "
                         "cannot hold the index's records; set data.cache_dir to a folder of your own")
    lock = os.open(folder / f".lock-{hexdigest}", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    _HELD_LOCKS.add(lock)
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError as err:
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                raise
        if not _whole(path, size):  # not fetched by another process while we waited
            _download(url, path, size, hexdigest, settings)
    finally:
        _HELD_LOCKS.discard(lock)
        os.close(lock)
    return path


# A flock belongs to the open file, which a fork shares: a process forked (a loader worker) while
# another thread of its parent holds the lock would keep it held through its inherited descriptor
# and then wait for it itself, forever. The child closes its copies; the parent's still hold the lock.
_HELD_LOCKS: set[int] = set()


def _close_inherited_locks() -> None:
    for fd in list(_HELD_LOCKS):
        os.close(fd)
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


def _whole(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except FileNotFoundError:
        return False


def _download(url: str, path: Path, size: int, hexdigest: str, settings: RemoteSettings) -> None:
    with atomic_write(path) as tmp:
        digest = blake3.blake3(max_threads=blake3.blake3.AUTO)
        with open_uncached(url, size=size, settings=settings) as source, open(tmp, "wb") as copy:
            while chunk := source.read(_CHUNK):
                digest.update(chunk)
                copy.write(chunk)
        if digest.hexdigest() != hexdigest:
            raise ValueError(f"{redact(url)}: the records downloaded have another BLAKE3 hash than index.json "
                             "records: the index and its records do not belong together; upload both again")
