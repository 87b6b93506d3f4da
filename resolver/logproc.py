"""The lookup log written by a child process, so SQLite never competes with DNS for the GIL.

Measured on the reference machine: a writer *thread* in the server process costs the
event loop far more than its own CPU time. Each row it inserts releases and re-takes
the GIL, the loop then waits for it, and under load the two hand it back and forth
(a convoy): the log-on server sustained only ~30k q/s and its p99 rose ~20x.

So `serve` runs the same `QueryLog` writer in a child process and feeds it over a
pipe. The hot path still only appends a tuple to a list (bounded: past ``queue_max``
records are counted as overflow, never blocking). Every ``FLUSH_INTERVAL`` the event
loop pickles what accumulated and writes it to a non-blocking pipe; a full pipe keeps
the records in the list (still bounded). The child owns the database: batching,
retention, overflow rows, error reporting on stderr -- everything `QueryLog` does.

If the server dies, the child sees end-of-file, writes what it has and exits; it
runs in its own session and ignores SIGINT/SIGTERM, so a Ctrl-C to the terminal cannot
kill it before the server has handed over the last records.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import time
from typing import Any

FLUSH_INTERVAL = 0.02
# Records pickled per hand-over: pickling is done on the event loop, so a backlog is handed
# over in slices (~2 ms each) rather than in one long stall. 5,000 per 20 ms is 250k/s.
MAX_BATCH = 5_000
PIPE_SIZE = 4 * 1024 * 1024
_F_SETPIPE_SZ = 1031  # Linux fcntl: grow the pipe so bursts do not stall the hand-over
_LEN = struct.Struct("!I")


class ProcessLog:
    """`QueryLog`'s interface (``submit``, ``start``, ``close``, ``overflow``), writer in a child."""

    def __init__(self, path: str, *, queue_max: int = 200_000, retention_days: float | None = 30) -> None:
        self.path = str(path)
        self.queue_max = queue_max
        self.retention_days = retention_days
        self.overflow = 0  # counted here; handed to the child, which stores it
        self._sent_overflow = 0
        self._pending: list[tuple] = []
        self._out = bytearray()
        self._fd = -1
        self._proc: Any = None
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- hot path -------------------------------------------------------------
    def submit(self, record: tuple) -> None:
        if len(self._pending) < self.queue_max:
            self._pending.append(record)
        else:
            self.overflow += 1

    # -- lifecycle ------------------------------------------------------------
    def start(self) -> None:
        """Start the writer process; call from inside the running event loop."""
        # A plain child (not multiprocessing: no resource-tracker process, no fork of a process
        # with threads and a loop) in its own session, so a Ctrl-C to the terminal's process
        # group reaches only the server, which then hands over the last records itself.
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "resolver.logproc", self.path, str(self.queue_max),
             "" if self.retention_days is None else str(self.retention_days)],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, close_fds=True, start_new_session=True,
            cwd=os.getcwd())
        assert self._proc.stdin is not None
        self._fd = os.dup(self._proc.stdin.fileno())
        self._proc.stdin.close()
        with contextlib.suppress(OSError):
            fcntl.fcntl(self._fd, _F_SETPIPE_SZ, PIPE_SIZE)
        os.set_blocking(self._fd, False)
        self._loop = asyncio.get_running_loop()
        self._timer = self._loop.call_later(FLUSH_INTERVAL, self._tick)

    def _tick(self) -> None:
        self._flush()
        if self._loop is not None:
            self._timer = self._loop.call_later(FLUSH_INTERVAL, self._tick)

    def _frame(self, message: object) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        self._out += _LEN.pack(len(data)) + data

    def _flush(self) -> None:
        # Serialise only when the previous hand-over has left: a stalled child must
        # cost bounded memory (the pending list), not an ever-growing byte buffer.
        if not self._out:
            if self._pending:
                if len(self._pending) <= MAX_BATCH:
                    batch, self._pending = self._pending, []
                else:
                    batch = self._pending[:MAX_BATCH]
                    del self._pending[:MAX_BATCH]
                self._frame(("rows", batch))
            if self.overflow != self._sent_overflow:
                self._frame(("overflow", self.overflow - self._sent_overflow))
                self._sent_overflow = self.overflow
        if self._out and self._fd >= 0:
            try:
                written = os.write(self._fd, self._out)
            except BlockingIOError:
                return
            except OSError as exc:  # the child is gone: say so once, keep answering DNS
                print(f"dnsguard: lookup log writer process is gone ({exc}); lookups are not being "
                      f"recorded", file=sys.stderr, flush=True)
                os.close(self._fd)
                self._fd = -1
                return
            del self._out[:written]

    def stop_flushing(self) -> None:
        """Stop the periodic hand-over; call in the loop thread before `close` runs elsewhere."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._loop = None

    def close(self, timeout: float = 10.0) -> bool:
        """Hand over everything, then wait for the child to commit it. True if nothing was lost.

        May block for up to ``timeout`` (the child retries a locked database): run it off the
        event loop, after `stop_flushing`.
        """
        self.stop_flushing()
        if self._proc is None:
            return not self._pending
        deadline = time.monotonic() + timeout
        # Hand over the rest without ever blocking for good: a stalled child (a hung disk)
        # must not hold the server's exit hostage.
        while self._fd >= 0 and (self._pending or self._out or self.overflow != self._sent_overflow):
            self._flush()
            if self._out and self._fd >= 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                select.select([], [self._fd], [], min(left, 0.5))
        lost = len(self._pending) + (1 if self._out else 0)
        if self._fd >= 0:
            if not self._pending and not self._out:
                self._frame(None)
                with contextlib.suppress(OSError):
                    os.write(self._fd, self._out)
            os.close(self._fd)  # end-of-file: the child writes what it has and exits
            self._fd = -1
        try:
            self._proc.wait(max(0.5, deadline - time.monotonic()) + 2.0)
        except subprocess.TimeoutExpired:
            # It ignores SIGTERM (see main), so only SIGKILL ends a stuck writer.
            self._proc.kill()
            self._proc.wait(5.0)
            here = f" (and {len(self._pending)} not handed over)" if lost else ""
            print(f"dnsguard: lookup log writer did not finish in time; records still queued in it "
                  f"are lost{here}", file=sys.stderr, flush=True)
            return False
        if lost:
            print(f"dnsguard: lookup log: {len(self._pending)} records could not be handed to the writer",
                  file=sys.stderr, flush=True)
        return self._proc.returncode == 0 and not lost

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None


def _read_exact(stream: Any, n: int) -> bytes:
    data = stream.read(n)
    if data is None or len(data) < n:
        raise EOFError
    return data


def main(argv: list[str]) -> int:
    """The writer process: `python -m resolver.logproc DB QUEUE_MAX RETENTION_DAYS`, frames on stdin."""
    # The server decides when we stop (it sends None, or goes away and we see end-of-file).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Yield the CPU to the DNS server whenever both want it: answers wait on nothing we do,
    # and a backlog here is bounded and counted.
    with contextlib.suppress(OSError):
        os.nice(10)
    from .querylog import QueryLog

    path, queue_max, retention = argv[0], int(argv[1]), argv[2]
    log = QueryLog(path, queue_max=queue_max, retention_days=float(retention) if retention else None)
    log.start()
    submit = log.submit
    stream = sys.stdin.buffer
    while True:
        try:
            message = pickle.loads(_read_exact(stream, _read_exact_len(stream)))
        except (EOFError, OSError, pickle.UnpicklingError):
            break
        if message is None:
            break
        kind, payload = message
        if kind == "rows":
            for record in payload:
                submit(record)
        elif kind == "overflow":
            log.overflow += payload
    return 0 if log.close() else 1


def _read_exact_len(stream: Any) -> int:
    return _LEN.unpack(_read_exact(stream, 4))[0]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
