"""The lookup log written by a child process, so SQLite never competes with DNS for the GIL.

Measured on the reference machine: a writer *thread* in the server process costs the
event loop far more than its own CPU time. Each row it inserts releases and re-takes
the GIL, the loop then waits for it, and under load the two hand it back and forth
(a convoy): the log-on server sustained only ~30k q/s and its p99 rose ~20x.

So `serve` runs the same `QueryLog` writer in a child process and feeds it over a
pipe. The hot path still only appends a tuple to a list (bounded: past ``queue_max``
records are counted as overflow, never blocking). Every ``FLUSH_INTERVAL`` the event
loop serialises what accumulated (marshal) and writes it to a non-blocking pipe; a full pipe keeps
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
import gc
import marshal
import os
import select
import signal
import struct
import subprocess
import sys
import time
from typing import Any

FLUSH_INTERVAL = 0.02
# Records serialised per hand-over slice: that is done on the event loop, so a backlog is
# handed over in slices (~1 ms each) rather than in one long stall, and at most
# MAX_SLICES_PER_FLUSH slices per tick or per pipe-writable callback.
MAX_BATCH = 5_000
MAX_SLICES_PER_FLUSH = 2
# Pipe sizes to ask for, largest first. Linux caps unprivileged pipes at
# /proc/sys/fs/pipe-max-size (1 MiB by default) and refuses any growth once a user's pipes
# hold more than pipe-user-pages-soft; the hand-over must keep up on the default 64 KiB too.
PIPE_SIZES = (4 * 1024 * 1024, 1024 * 1024, 256 * 1024)
_F_SETPIPE_SZ = 1031  # Linux fcntl
_LEN = struct.Struct("!I")
GC_INTERVAL = 30.0
WRITER_BATCH = 20_000
WRITER_INTERVAL = 0.25  # s; under load a transaction gathers up to this long (or WRITER_BATCH rows)


class ProcessLog:
    """`QueryLog`'s interface (``submit``, ``start``, ``close``, ``overflow``), writer in a child."""

    def __init__(self, path: str, *, queue_max: int = 200_000, retention_days: float | None = 30,
                 max_size_mb: float | None = None, docker_socket: str = "") -> None:
        self.path = str(path)
        self.docker_socket = docker_socket
        self.queue_max = queue_max
        self.retention_days = retention_days
        self.max_size_mb = max_size_mb
        self.overflow = 0  # counted here; handed to the child, which stores it
        self.handed = 0  # rows serialised for the writer (counted per batch, off the hot path)
        self._sent_overflow = 0
        self._pending: list[tuple] = []
        self._out = bytearray()
        self._fd = -1
        self._proc: Any = None
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watching = False  # a pipe-writable callback is registered

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
            [sys.executable, "-m", "resolver.log.logproc", self.path, str(self.queue_max),
             "" if self.retention_days is None else str(self.retention_days),
             str(self.max_size_mb or 0), self.docker_socket],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, close_fds=True, start_new_session=True,
            cwd=os.getcwd())
        assert self._proc.stdin is not None
        self._fd = os.dup(self._proc.stdin.fileno())
        self._proc.stdin.close()
        for size in PIPE_SIZES:
            try:
                fcntl.fcntl(self._fd, _F_SETPIPE_SZ, size)
                break
            except OSError:
                continue
        os.set_blocking(self._fd, False)
        self._loop = asyncio.get_running_loop()
        self._timer = self._loop.call_later(FLUSH_INTERVAL, self._tick)

    def _tick(self) -> None:
        try:
            self._flush()
        finally:  # whatever happened, the hand-over goes on
            if self._loop is not None:
                self._timer = self._loop.call_later(FLUSH_INTERVAL, self._tick)

    def _frame(self, message: object) -> None:
        # marshal, not pickle: records are tuples of str/bytes/float/int/bool/None, both ends are
        # the same interpreter, and dumping costs the event loop 0.16 µs a record, not 0.38.
        try:
            data = marshal.dumps(message, 4)
        except ValueError:  # some field of some record is not a plain value: never lose the batch
            data = marshal.dumps(_plain(message), 4)
        self._out += _LEN.pack(len(data)) + data

    def _serialise(self) -> None:
        """Move the next slice of records (and any new overflow count) into the out buffer."""
        if self._pending:
            if len(self._pending) <= MAX_BATCH:
                batch, self._pending = self._pending, []
            else:
                batch = self._pending[:MAX_BATCH]
                del self._pending[:MAX_BATCH]
            try:
                self._frame(("rows", batch))
                self.handed += len(batch)
            except Exception as exc:  # cannot happen for what the server submits; counted if it does
                self.overflow += len(batch)
                print(f"dnsguard: lookup log: {len(batch)} records could not be serialised ({exc}); "
                      f"counted as not logged", file=sys.stderr, flush=True)
        if self.overflow != self._sent_overflow:
            self._frame(("overflow", self.overflow - self._sent_overflow))
            self._sent_overflow = self.overflow

    def _flush(self) -> None:
        # Serialise only when the previous slice has left: a stalled child must cost bounded
        # memory (the pending list), not an ever-growing byte buffer. When the pipe fills, the
        # loop calls back as soon as the child has read some (not a whole tick later: with a
        # 64 KiB pipe, waiting for ticks capped the hand-over near 30k records/s).
        for _ in range(MAX_SLICES_PER_FLUSH):
            if not self._out:
                self._serialise()
                if not self._out:
                    break
            if self._fd < 0:
                return
            try:
                written = os.write(self._fd, self._out)
            except BlockingIOError:
                self._watch_pipe(True)
                return
            except OSError as exc:  # the child is gone: say so once, keep answering DNS
                print(f"dnsguard: lookup log writer process is gone ({exc}); lookups are not being "
                      f"recorded", file=sys.stderr, flush=True)
                self._watch_pipe(False)
                os.close(self._fd)
                self._fd = -1
                return
            del self._out[:written]
            if self._out:
                self._watch_pipe(True)
                return
        # Keep the callback only for a backlog of at least a whole slice: a pipe is almost always
        # writable, so watching it for a few records would spin the loop on tiny hand-overs.
        self._watch_pipe(bool(self._out) or len(self._pending) >= MAX_BATCH)

    def _watch_pipe(self, on: bool) -> None:
        if on == self._watching or self._loop is None or self._fd < 0:
            return
        if on:
            self._loop.add_writer(self._fd, self._flush)
        else:
            self._loop.remove_writer(self._fd)
        self._watching = on

    def configure(self, *, retention_days: float | None, max_size_mb: float | None, queue_max: int) -> None:
        """New [log] bounds from a policy reload: this side's queue bound now, the writer's
        retention, size cap and queue bound with the next hand-over."""
        self.queue_max = queue_max
        self.retention_days = retention_days
        self.max_size_mb = max_size_mb
        self._frame(("config", (retention_days, max_size_mb or 0, queue_max)))

    def stop_flushing(self) -> None:
        """Stop the periodic hand-over; call in the loop thread before `close` runs elsewhere."""
        self._watch_pipe(False)
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


_EXACT = frozenset((str, bytes, int, float, bool, type(None)))


def _plain(value: object) -> object:
    """``value`` with every container rebuilt as a tuple or list and every leaf of another type
    (marshal refuses even subclasses such as IntEnum) turned into a plain value or its str."""
    if type(value) in _EXACT:
        return value
    if isinstance(value, tuple | list):
        return (tuple if isinstance(value, tuple) else list)(_plain(v) for v in value)
    for kind in (bool, int, float, bytes):
        if isinstance(value, kind):
            return kind(value)
    return str.__str__(value) if isinstance(value, str) else str(value)


def _read_exact(stream: Any, n: int) -> bytes:
    data = stream.read(n)
    if data is None or len(data) < n:
        raise EOFError
    return data


def leave_server_cpus() -> set[int] | None:
    """When the server is pinned to some CPUs (taskset, systemd CPUAffinity=), run the writer on
    the others; returns the CPUs it now runs on, None when nothing changed.

    A child inherits its parent's affinity, so a pinned server's writer shares its CPU, and
    each of the writer's bursts keeps a waking event loop waiting for the CPU -- on a kernel
    that reschedules fair-class wake-ups lazily, until the next tick: the milliseconds of the
    log-on p99 tail (docs/performance.md, issue #15). An unpinned server's writer is left to
    the scheduler, as are CPUs a cgroup does not allow.
    """
    try:
        mine = os.sched_getaffinity(0)
        others = set(range(os.cpu_count() or 1)) - mine
        if not others:
            return None
        os.sched_setaffinity(0, others)
    except (OSError, AttributeError):  # a cpuset without those CPUs, or not Linux
        return None
    return others


def main(argv: list[str]) -> int:
    """The writer process, frames on stdin:
    `python -m resolver.log.logproc DB QUEUE_MAX RETENTION_DAYS [MAX_SIZE_MB [DOCKER_SOCKET]]`."""
    # The server decides when we stop (it sends None, or goes away and we see end-of-file).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Yield the CPU to the DNS server whenever both want it: answers wait on nothing we do,
    # and a backlog here is bounded and counted.
    with contextlib.suppress(OSError):
        os.nice(10)
    leave_server_cpus()
    from resolver.log.clients import ClientNames
    from resolver.log.querylog import QueryLog

    # Every row allocates tuples, and with the cyclic collector on, its generation-0 and
    # -2 passes over the batch in flight (and the id caches) took more than half of the
    # writer's Python time. Nothing this process keeps forms cycles, so collect rarely,
    # by hand.
    gc.disable()
    next_gc = time.monotonic() + GC_INTERVAL

    path, queue_max, retention = argv[0], int(argv[1]), argv[2]
    max_size_mb = float(argv[3]) if len(argv) > 3 else 0.0
    # Client names (containers, fenced users) are looked up here, off the DNS path.
    names = ClientNames(argv[4] if len(argv) > 4 else "").start()
    # Big transactions: per-commit costs (WAL frames for the index and rollup pages a batch
    # touches) are paid once per batch, not per row.
    log = QueryLog(path, queue_max=queue_max, retention_days=float(retention) if retention else None,
                   batch_max=WRITER_BATCH, batch_interval=WRITER_INTERVAL, max_size_mb=max_size_mb,
                   namer=names.name)
    log.start()
    submit_many = log.submit_many
    stream = sys.stdin.buffer
    while True:
        try:
            message = marshal.loads(_read_exact(stream, _read_exact_len(stream)))
        except (EOFError, OSError, ValueError, TypeError):
            break
        if message is None:
            break
        if time.monotonic() >= next_gc:
            gc.collect()
            next_gc = time.monotonic() + GC_INTERVAL
        kind, payload = message
        if kind == "rows":
            submit_many(payload)
        elif kind == "overflow":
            log.overflow += payload
        elif kind == "config":
            log.configure(*payload)
    return 0 if log.close() else 1


def _read_exact_len(stream: Any) -> int:
    return _LEN.unpack(_read_exact(stream, 4))[0]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
