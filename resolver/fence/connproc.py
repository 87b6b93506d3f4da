"""The conntrack recorder (`resolver.fence.connrec`) in a process of its own.

Reading conntrack costs a few events per connection, each parsed in Python: run as a thread
of `serve`, it shared the interpreter lock with the query path, and at 1,000 connections/s
the DNS answers' average latency went from 0.4 ms to 3.9 ms (docs/performance.md). In a
child process it costs the server one pipe write per fed address whose name changed.

`ConnRecorderProcess` (in `serve`):

* `start()` runs ``python -m resolver.fence.connproc DB POLICY REFRESH`` in its own session
  and waits for its "ready" line (an error line -> OSError: conntrack cannot be read);
* `note(addrs, name)`, called by the fence's feed before an answer leaves, hands the child
  the name behind each address (the ``name`` of a connection row). Frames are short
  (<= PIPE_BUF, so atomic) and written without blocking: a full pipe loses the note, counted
  in `lost_notes`, never stalls the query path;
* `stop()` closes the pipe; the child writes what it has and exits.

The child reads the policy file for ``client`` and ``rule`` and re-reads it when it changes
(a file that does not parse leaves the one it has, as `serve` does).
"""

from __future__ import annotations

import marshal
import os
import select
import sqlite3
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterable

from resolver.core.logdb import ensure_connections_table

__all__ = ["ConnRecorderProcess", "main"]

_LEN = struct.Struct("=I")
FRAME_MAX = 4000  # under PIPE_BUF (4096): a write of one frame is all or nothing
# The parent remembers which name it last sent for each address (so it sends only changes);
# the child keeps the names it was sent. Both evict their least recently *sent* entries, in
# the same order, and the child keeps at least twice as many (a restart replays the parent's
# whole map first): every address the parent believes the child knows, the child knows.
SENT_MAX = 65_536
NAMES_MAX = 262_144
START_TIMEOUT = 15.0
RESTART_MIN_S = 1.0  # first restart delay; doubles per restart up to RESTART_MAX_S
RESTART_MAX_S = 60.0
STABLE_S = 60.0  # up this long: the next death restarts after RESTART_MIN_S again
START_FAILURES_MAX = 10  # consecutive failed starts, then give up (the gap stays open)
LOST_FLUSH_S = 10.0  # how often lost notes are written to connection_overflow


class ConnRecorderProcess:
    """The parent's end: start, feed names, supervise, stop.

    `up` (a plain attribute, read by metrics) says whether the child is running; `restarts`
    counts its deaths. A thread of the parent (off the event loop) waits on the child: when it
    dies, the period until a new one is ready is written to ``connection_gaps``, and the new one
    is started after a delay that doubles per death (bounded); ``lost_notes`` are written to
    ``connection_overflow.lost_names`` every LOST_FLUSH_S.
    """

    def __init__(self, database: str, policy_path: str | None, refresh: float, *, sent_max: int = SENT_MAX,
                 restart_min: float = RESTART_MIN_S, restart_max: float = RESTART_MAX_S) -> None:
        if NAMES_MAX < 2 * sent_max:
            raise ValueError("the child must keep at least twice the names the parent remembers sending")
        self.database = database
        self.policy_path = policy_path
        self.refresh = refresh
        self.sent_max = sent_max
        self.restart_min, self.restart_max = restart_min, restart_max
        self.lost_notes = 0
        self.restarts = 0
        self.up = False
        self._lost_saved = 0
        self._proc: subprocess.Popen | None = None
        self._fd = -1
        self._sent: dict[str, object] = {}
        self._stopping = False
        self._lock = threading.Lock()
        self._wake_r = self._wake_w = -1
        self._thread: threading.Thread | None = None

    def _spawn(self) -> tuple[subprocess.Popen, int]:
        """A new child, ready; its stdin as a (blocking) descriptor."""
        proc = subprocess.Popen(
            [sys.executable, "-m", "resolver.fence.connproc", self.database, self.policy_path or "",
             str(self.refresh)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True, start_new_session=True,
            cwd=os.getcwd())
        assert proc.stdin is not None and proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], START_TIMEOUT)
        line = proc.stdout.readline().decode(errors="replace").strip() if ready else ""
        proc.stdout.close()
        if line != "ready":
            _kill(proc)
            raise OSError(line.removeprefix("error: ") or "the connection recorder did not start")
        fd = os.dup(proc.stdin.fileno())
        proc.stdin.close()
        return proc, fd

    def start(self) -> None:
        self._proc, self._fd = self._spawn()
        os.set_blocking(self._fd, False)
        self.up = True
        # A gap an earlier serve could not close (it gave up, or was killed) ends here.
        self._write("UPDATE connection_gaps SET until = ? WHERE until IS NULL", (time.time(),))
        self._stopping = False
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._supervise, name="conn-recorder-watch", daemon=True)
        self._thread.start()

    # -- hot path (the fence's feed, once per answer or cache refresh)
    def note(self, addrs: Iterable[tuple[str, int]], name: object) -> None:
        sent = self._sent
        fresh = [ip for ip, _ in addrs if sent.get(ip) != name]
        if not fresh or self._fd < 0:
            return
        frame = marshal.dumps((name, fresh))
        if len(frame) + 4 > FRAME_MAX:  # hundreds of addresses: split
            half = len(fresh) // 2
            self.note(((ip, 0) for ip in fresh[:half]), name)
            self.note(((ip, 0) for ip in fresh[half:]), name)
            return
        try:
            os.write(self._fd, _LEN.pack(len(frame)) + frame)
        except OSError:  # a full pipe, or the child is gone: the note is lost (and counted), DNS goes on
            self.lost_notes += len(fresh)
            return
        for ip in fresh:
            sent.pop(ip, None)  # re-insert: the dict's order is when it was last sent
            sent[ip] = name
        while len(sent) > self.sent_max:
            del sent[next(iter(sent))]

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        if self._wake_w >= 0:
            os.write(self._wake_w, b"x")
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)  # the child writes what it has and exits
                self._fd = -1
            proc = self._proc
        if proc is not None:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                _kill(proc)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self.flush_lost()
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1
        self._proc = None
        self.up = False

    close = stop

    # -- the supervisor thread
    def _supervise(self) -> None:
        delay = self.restart_min
        while True:
            proc = self._proc
            assert proc is not None
            up_since = time.monotonic()
            while not self._wait(proc, LOST_FLUSH_S):
                self.flush_lost()
            if self._stopping:
                return
            self.up = False
            self.restarts += 1
            since = time.time()
            if time.monotonic() - up_since >= STABLE_S:  # it had been running a while: start over
                delay = self.restart_min
            print(f"dnsguard: the connection recorder exited (status {proc.returncode}); connections are "
                  f"not recorded until it is back, restarting in {delay:.0f} s", file=sys.stderr, flush=True)
            gap = self._write("INSERT INTO connection_gaps (since, until, reason) VALUES (?, NULL, ?)",
                              (since, f"connection recorder exited with status {proc.returncode}"))
            failures = 0
            while not self._respawned(delay):
                if self._stopping:
                    break
                failures += 1
                delay = min(delay * 2, self.restart_max)
                if failures >= START_FAILURES_MAX:
                    print(f"dnsguard: the connection recorder failed to start {failures} times; giving up: "
                          "connections are not recorded until serve restarts", file=sys.stderr, flush=True)
                    return
            delay = min(delay * 2, self.restart_max)
            if gap is not None:
                self._write("UPDATE connection_gaps SET until = ? WHERE rowid = ?", (time.time(), gap))
            if self._stopping:
                return
            self.up = True
            print("dnsguard: the connection recorder is back", file=sys.stderr, flush=True)

    def _wait(self, proc: subprocess.Popen, timeout: float) -> bool:
        """Wait up to ``timeout`` for the child to exit or for stop(); True if either happened."""
        try:
            pidfd = os.pidfd_open(proc.pid)
        except OSError:  # already reaped, or an old kernel: poll
            pidfd = -1
        try:
            select.select([self._wake_r] + ([pidfd] if pidfd >= 0 else []), [], [],
                          timeout if pidfd >= 0 else min(timeout, 1.0))
        finally:
            if pidfd >= 0:
                os.close(pidfd)
        return self._stopping or proc.poll() is not None

    def _respawned(self, delay: float) -> bool:
        """After ``delay`` (cut short by stop()), start a new child and hand it the names the old
        one had; True once it runs."""
        select.select([self._wake_r], [], [], delay)
        if self._stopping:
            return False
        try:
            proc, fd = self._spawn()
        except OSError as exc:
            print(f"dnsguard: the connection recorder did not start: {exc}", file=sys.stderr, flush=True)
            return False
        with self._lock:
            if self._stopping or self._fd < 0:
                os.close(fd)
                _kill(proc)
                return False
            try:
                self._replay(fd)
            except OSError as exc:
                os.close(fd)
                _kill(proc)
                print(f"dnsguard: the connection recorder did not take its names: {exc}", file=sys.stderr,
                      flush=True)
                return False
            os.set_blocking(fd, False)
            # The same descriptor number now leads to the new child: note() on the event loop
            # never sees a closed or reused descriptor.
            os.dup2(fd, self._fd, inheritable=False)
            os.close(fd)
            self._proc = proc
        return True

    def _replay(self, fd: int) -> None:
        """Send the new child every name the parent believes sent, oldest first (the same order)."""
        items = list(self._sent.items())  # one C-level copy: safe against the loop's inserts
        i = 0
        while i < len(items):
            name, ips = items[i][1], []
            while i < len(items) and items[i][1] == name and len(ips) < 100:
                ips.append(items[i][0])
                i += 1
            frame = marshal.dumps((name, ips))
            os.write(fd, _LEN.pack(len(frame)) + frame)

    def flush_lost(self) -> None:
        """Write the notes lost since the last flush to ``connection_overflow.lost_names``."""
        lost = self.lost_notes - self._lost_saved
        if lost > 0 and self._write("INSERT INTO connection_overflow (ts, dropped, overruns, lost_names) "
                                    "VALUES (?, 0, 0, ?)", (time.time(), lost)) is not None:
            self._lost_saved += lost

    def _write(self, sql: str, params: tuple) -> int | None:
        """One statement on the log, from the supervisor thread; the row id, or None if it failed."""
        try:
            db = sqlite3.connect(self.database, timeout=5.0)
            try:
                ensure_connections_table(db)
                cur = db.execute(sql, params)
                db.commit()
                return cur.lastrowid or 0
            finally:
                db.close()
        except sqlite3.Error as exc:
            print(f"dnsguard: cannot write the connection log ({exc})", file=sys.stderr, flush=True)
            return None


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(5)


# ------------------------------------------------------------------ the child

class _Control:
    """Reads name frames from stdin; re-reads the policy when its file changes."""

    def __init__(self, fd: int, policy_path: str | None, names_max: int = NAMES_MAX) -> None:
        self.fd = fd
        self.buf = b""
        self.names: dict[str, object] = {}
        self.names_max = names_max
        self.policy_path = policy_path
        self.config: object = None
        self._stat: tuple[float, int] | None = None
        self.reload()

    def reload(self) -> None:
        if not self.policy_path:
            return
        try:
            st = os.stat(self.policy_path)
        except OSError:
            return
        stat = (st.st_mtime, st.st_size)
        if stat == self._stat:
            return
        self._stat = stat
        from resolver.policy.config import load_config

        try:
            self.config = load_config(self.policy_path)
        except Exception as exc:  # noqa: BLE001 - keep the policy we have, like serve
            print(f"dnsguard: connection recorder keeps its policy: {exc}", file=sys.stderr, flush=True)

    def __call__(self) -> bool:
        while True:
            try:
                chunk = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return True
            if not chunk:
                return False
            self.buf += chunk
            self._frames()

    def _frames(self) -> None:
        buf, pos, names = self.buf, 0, self.names
        while pos + 4 <= len(buf):
            (n,) = _LEN.unpack_from(buf, pos)
            if pos + 4 + n > len(buf):
                break
            try:
                name, ips = marshal.loads(buf[pos + 4:pos + 4 + n])
            except (ValueError, EOFError, TypeError):
                name, ips = None, ()
            for ip in ips:
                names.pop(ip, None)  # re-insert: the dict's order is when it was last sent
                names[ip] = name
            while len(names) > self.names_max:  # the least recently sent go first, as in the parent
                del names[next(iter(names))]
            pos += 4 + n
        self.buf = buf[pos:]


def main(argv: list[str]) -> int:
    from resolver.fence.connrec import ConnRecorder
    from resolver.fence.describe import policy_describer

    database, policy_path, refresh = argv[0], argv[1] or None, float(argv[2])
    os.set_blocking(0, False)
    control = _Control(0, policy_path)
    recorder = ConnRecorder(database, name_of=control.names.get,
                            describe=policy_describer(lambda: control.config), refresh=refresh,
                            control=(0, control))
    try:
        recorder.start()
    except OSError as exc:
        print(f"error: {exc}", flush=True)
        return 1
    print("ready", flush=True)
    os.close(1)
    thread = recorder._thread
    while thread is not None and thread.is_alive():
        thread.join(1.0)
        control.reload()
    # Not stopping: the thread died of an error (it said which on stderr); the parent restarts us.
    died = not recorder._stopping
    recorder.stop()
    return 1 if died else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
