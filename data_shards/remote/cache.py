"""The optional local cache of whole remote shards (settings.cache_dir), for data read many epochs: it
deletes only the copies it wrote (see ShardCache)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import stat
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from data_shards.atomic import atomic_write, replace_durably
from data_shards.remote.errors import ShardReadError
from data_shards.remote.local import open_local, positioned
from data_shards.remote.reader import CHUNK
from data_shards.remote.settings import RemoteSettings
from data_shards.remote.text import USERINFO, printable, redact
from data_shards.remote.uncached import open_uncached

CACHE_SUBFOLDER = "restormer-shard-cache"


def folder_overlap(cache_dir: str | Path, folder: str | Path) -> str | None:
    """How a cache folder overlaps `folder` (is it, lies inside it, or holds it), or None. The cache
    deletes what it evicts, so it must live apart from a run's files."""
    cache, other = Path(cache_dir).resolve(), Path(folder).resolve()
    if cache == other:
        return "is"
    if other in cache.parents:
        return "is inside"
    if cache in other.parents:
        return "holds"
    return None


def cache_folder_problem(cache_dir: str | Path) -> str | None:
    """Why cache_dir's CACHE_SUBFOLDER cannot be the cache's own folder, or None. Eviction deletes inside
    it, so it must be a real folder (the cache creates it), not a link to somewhere else."""
    folder = Path(cache_dir) / CACHE_SUBFOLDER
    if folder.is_symlink():
        return (f"{folder} is a symbolic link: the cache deletes the copies it evicts in that folder, so it keeps "
                "them only in a folder of its own; remove the link (the cache creates the folder)")
    if folder.exists() and not folder.is_dir():
        return f"{folder} is not a folder: the cache keeps its copies in a folder of that name; move the file away"
    return None


class ShardCache:
    """Whole-shard copies in settings.cache_dir/CACHE_SUBFOLDER, at most settings.cache_limit_bytes in all.

    - Ownership: the cache deletes only what it wrote. Its manifest file lists the copies it wrote;
      eviction and the removal of a bad copy touch only listed files, and a file at a copy's name
      that the manifest does not list is never deleted or overwritten (the shard is then streamed,
      not kept). Besides listed copies it deletes only its own temporary files (.tmp-PID-THREAD-NAME)
      left for an hour by a dead process. Other files in cache_dir or the subfolder are left alone.
      The manifest is not trusted either: a name in it that is not one path_for gives (an absolute
      path, `../`, any separator) is ignored with a warning, and so is a manifest that is a symbolic
      link or not a regular file; a subfolder that is a symbolic link is refused (cache_folder_problem).
    - A miss downloads the whole shard (through the retrying reader) to a temporary file in the
      subfolder, checks its size and sha256 against the index's when given, and renames it into
      place: readers only ever see complete files. One process per host downloads a given shard
      while the others that miss it wait on a lock file (flock: released by the kernel if that
      process dies) and then read its copy; without working flock (some network file systems) they
      download it too, and the atomic rename still keeps every copy whole.
    - A hit checks the size every time, and the sha256 once per process and copy (a copy left by an
      earlier run or another process is hashed before its first use here; hashing on every open
      would cost a shard's read per sample for a reader that seeks). A copy that fails is deleted,
      named in a warning and fetched again. Bytes changed in place after a process checked them
      (the same file, the same size) go unseen by that process; the stream's per-sample digests
      still refuse the samples they change.
    - After each download the least recently used listed copies (hits touch the file's mtime) are
      deleted until they are within the limit; an open copy stays readable after its deletion
      (POSIX). Concurrent downloads can overshoot the limit by the shards in flight. A shard larger
      than the whole limit is streamed from its download and not kept.
    - Copies are named by a hash of the URL without credentials or query, so a re-signed presigned
      URL still hits, and no secret reaches a file name.
    """

    _STALE_TMP_S = 3600  # a temporary file untouched this long belongs to a dead process
    _HASH_CHARS, _TAIL_CHARS = 24, 80  # a copy's name: this much of the URL's sha256, a dash, the URL's tail
    _COPY = re.compile(rf"[0-9a-f]{{{_HASH_CHARS}}}-[A-Za-z0-9._-]{{0,{_TAIL_CHARS}}}")  # every name path_for gives
    _TMP = re.compile(rf"\.tmp-(\d+-\d+-{_COPY.pattern}|manifest-\d+-\d+)")
    MANIFEST = "manifest.txt"

    def __init__(self, settings: RemoteSettings):
        if settings.cache_dir is None or settings.cache_limit_bytes is None:
            raise ValueError("ShardCache needs settings.cache_dir and settings.cache_limit_bytes")
        self.settings = settings
        self.folder = Path(settings.cache_dir) / CACHE_SUBFOLDER
        self.limit = settings.cache_limit_bytes

    def path_for(self, url: str) -> Path:
        stable = USERINFO.sub(lambda m: m["scheme"], url).split("?", 1)[0]
        tail = re.sub(r"[^A-Za-z0-9._-]", "_", stable.rstrip("/").rsplit("/", 1)[-1])[-self._TAIL_CHARS:]
        return self.folder / f"{hashlib.sha256(stable.encode()).hexdigest()[:self._HASH_CHARS]}-{tail}"

    def open(self, url: str, offset: int = 0, *, size: int | None = None, sha256: str | None = None) -> BinaryIO:
        problem = cache_folder_problem(self.settings.cache_dir)
        if problem:
            raise ShardReadError(url, problem)
        path = self.path_for(url)
        stream = self._hit(url, path, offset, size, sha256)
        if stream is not None:
            return stream
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(f".lock-{path.name}"), "ab") as lock:
            _flock(lock)
            stream = self._hit(url, path, offset, size, sha256)  # fetched by another process while we waited?
            return stream if stream is not None else self._fetch(url, path, offset, size, sha256)

    def _hit(self, url: str, path: Path, offset: int, size: int | None, sha256: str | None) -> BinaryIO | None:
        try:
            stream = open(path, "rb")  # noqa: SIM115 (opened first: an eviction from now on cannot hurt)
        except FileNotFoundError:
            return None
        problem = _check_copy(stream, size, sha256)
        if problem is None:
            try:
                os.utime(path)
            except FileNotFoundError:  # evicted by another process since we opened it: still readable
                pass
            return positioned(url, stream, offset)
        stream.close()
        with self._manifest() as owned:
            if path.name in owned:
                owned.remove(path.name)
                path.unlink(missing_ok=True)
                warnings.warn(f"cached copy of shard {redact(url)} ({path}) {problem}: fetching it again", stacklevel=3)
            else:
                warnings.warn(f"{path} {problem}, and the cache did not write it (not in its {self.MANIFEST}): left "
                              f"alone; shard {redact(url)} is read without the cache", stacklevel=3)
        return None

    def _fetch(self, url: str, path: Path, offset: int, size: int | None, sha256: str | None) -> BinaryIO:
        tmp = path.with_name(f".tmp-{os.getpid()}-{threading.get_ident()}-{path.name}")
        try:
            digest = hashlib.sha256()
            with open_uncached(url, size=size, settings=self.settings) as source, open(tmp, "wb") as copy:
                while chunk := source.read(CHUNK):
                    digest.update(chunk)
                    copy.write(chunk)
            if sha256 is not None and digest.hexdigest() != sha256:
                raise ShardReadError(url, f"downloaded sha256 {digest.hexdigest()[:16]}... differs from the index's "
                                          f"{sha256[:16]}...: changed since it was packed; re-pack or re-upload")
            stream = open_local(url, tmp, offset, size)  # before the rename: no eviction can take it now
            _mark_verified(stream, sha256)
            fetched = os.fstat(stream.fileno()).st_size
            if fetched > self.limit:
                warnings.warn(f"shard {redact(url)} ({fetched} bytes) is larger than the whole cache limit "
                              f"({self.limit} bytes): streamed, not kept", stacklevel=3)
                return stream
            self._admit(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return stream

    def _admit(self, tmp: Path, path: Path) -> None:
        """Lists the copy, renames it into place and evicts, in one turn of the manifest's lock: a listed
        name's file is always one the cache wrote (or gone)."""
        with self._manifest() as owned:
            if path.exists() and path.name not in owned:
                return  # someone else's file at this name: not overwritten, the download is streamed
            owned.add(path.name)
            replace_durably(tmp, path)
            self._evict(owned, keep=path)

    def _evict(self, owned: set[str], keep: Path) -> None:
        copies, now = [], time.time()
        for name in sorted(owned):
            try:
                copy = (self.folder / name).stat()
            except FileNotFoundError:  # removed by hand, or a process died between listing and renaming
                owned.discard(name)
                continue
            copies.append((copy.st_mtime, copy.st_size, name))
        total = sum(size for _, size, _ in copies)
        for _, size, name in sorted(copies):
            if total <= self.limit:
                break
            if name != keep.name:
                (self.folder / name).unlink(missing_ok=True)
                owned.discard(name)
                total -= size
        for entry in os.scandir(self.folder):  # this cache's own temporary files, left by dead processes
            if self._TMP.fullmatch(entry.name):
                try:
                    if now - entry.stat().st_mtime > self._STALE_TMP_S:
                        Path(entry.path).unlink(missing_ok=True)
                except FileNotFoundError:
                    pass

    @contextlib.contextmanager
    def _manifest(self) -> Iterator[set[str]]:
        """The names of the copies the cache wrote, held under an exclusive lock; changes to the set are
        written back (atomically) when the block ends."""
        self.folder.mkdir(parents=True, exist_ok=True)
        manifest = self.folder / self.MANIFEST
        with open(self.folder / f".lock-{self.MANIFEST}", "ab") as lock:
            _flock(lock)
            owned = self._read_manifest(manifest)
            before = set(owned)
            yield owned
            if owned != before:
                tmp = manifest.with_name(f".tmp-manifest-{os.getpid()}-{threading.get_ident()}")
                with atomic_write(manifest, tmp) as path:
                    path.write_text("".join(f"{name}\n" for name in sorted(owned)), encoding="utf-8")

    def _read_manifest(self, manifest: Path) -> set[str]:
        """The copy names listed in `manifest`: only names path_for gives, so that no damaged or hostile
        line (`../../run/config.yaml`, an absolute path) can make eviction delete outside the folder."""
        def ignored(what: str) -> set[str]:
            warnings.warn(f"{manifest} is {what}, not the file the cache writes: ignored (the copies it lists are "
                          "left alone; a regular file replaces it at the next change)", stacklevel=4)
            return set()

        try:  # not followed: a link's target is not the cache's; non-blocking: a FIFO must not hang the reader
            fd = os.open(manifest, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            return set()
        except OSError as err:
            if err.errno != errno.ELOOP:
                raise
            return ignored("a symbolic link")
        with open(fd, "rb") as handle:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return ignored("not a regular file")
            names = handle.read().decode("utf-8", errors="replace").split()
        owned = {name for name in names if self._COPY.fullmatch(name)}
        foreign = [name for name in names if name not in owned]
        if foreign:
            warnings.warn(f"{manifest}: ignored {len(foreign)} name(s) that the cache never gives a copy, e.g. "
                          f"'{printable(foreign[0][:100])}' (damaged or edited): the files they name are left alone",
                          stacklevel=4)
        return owned


_VERIFIED: set[tuple[int, int, int, str]] = set()  # (device, inode, size, sha256) this process has hashed


def _flock(handle: BinaryIO) -> None:
    """An exclusive lock on the open file, held until it is closed; a no-op where flock is unsupported."""
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
    except OSError as err:
        if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
            raise


def _check_copy(stream: BinaryIO, size: int | None, sha256: str | None) -> str | None:
    """None when the open cached file matches what the index says, else what is wrong."""
    copy = os.fstat(stream.fileno())
    if size is not None and copy.st_size != size:
        return f"has {copy.st_size} bytes, the index says {size}"
    if sha256 is None or (copy.st_dev, copy.st_ino, copy.st_size, sha256) in _VERIFIED:
        return None
    digest = hashlib.sha256()
    while chunk := stream.read(CHUNK):
        digest.update(chunk)
    if digest.hexdigest() != sha256:
        return "does not match the index's sha256"
    _mark_verified(stream, sha256)
    return None


def _mark_verified(stream: BinaryIO, sha256: str | None) -> None:
    if sha256 is not None:
        copy = os.fstat(stream.fileno())
        _VERIFIED.add((copy.st_dev, copy.st_ino, copy.st_size, sha256))
