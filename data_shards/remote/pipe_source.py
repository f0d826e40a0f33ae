"""pipe:COMMAND shards (webdataset's convention): COMMAND writes the shard to stdout; the bytes before
the offset are read and dropped."""

from __future__ import annotations

import os
import select
import signal
import subprocess
from dataclasses import dataclass

from data_shards.remote.errors import SourceFault
from data_shards.remote.reader import Opened, discard


class PipeStream:
    """stdout of a shell command, each read bounded by the timeout."""

    def __init__(self, command: str, timeout_s: float):
        # Its own process group, so that closing a half-read shard also ends what the shell started.
        self._process = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE,  # noqa: S602 (the user's own)
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        self._timeout_s = timeout_s

    def read(self, n: int) -> bytes:
        stdout = self._process.stdout
        ready, _, _ = select.select([stdout], [], [], self._timeout_s)
        if not ready:
            raise TimeoutError(f"no output from the command for {self._timeout_s} s")
        data = os.read(stdout.fileno(), n)
        if not data:
            status = self._process.wait(timeout=self._timeout_s)
            if status != 0:
                raise CommandFailed(status)
        return data

    def close(self) -> None:
        if self._process.poll() is None:
            try:
                os.killpg(self._process.pid, signal.SIGKILL)
            except ProcessLookupError:  # it ended meanwhile
                pass
        self._process.stdout.close()
        self._process.wait()


class CommandFailed(SourceFault, ChildProcessError):
    def __init__(self, status: int):
        self.status = status
        super().__init__(f"the command exited with status {status}")


@dataclass(frozen=True)
class PipeSource:
    command: str
    timeout_s: float

    def open(self, position: int, end: int | None) -> tuple[Opened, int | None]:  # the reader stops at end
        stream = PipeStream(self.command, self.timeout_s)
        try:
            discard(stream, position)
        except BaseException:
            stream.close()
            raise
        return stream, None

    def transient(self, error: BaseException) -> bool:
        if isinstance(error, CommandFailed):
            return error.status not in (126, 127)  # not executable / not found: retrying cannot help
        return isinstance(error, OSError)
