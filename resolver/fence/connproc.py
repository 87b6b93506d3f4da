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
import struct
import subprocess
import sys
from collections.abc import Iterable

__all__ = ["ConnRecorderProcess", "main"]

_LEN = struct.Struct("=I")
FRAME_MAX = 4000  # under PIPE_BUF (4096): a write of one frame is all or nothing
SENT_MAX = 65536
NAMES_MAX = 262_144
START_TIMEOUT = 15.0


class ConnRecorderProcess:
    """The parent's end: start, feed names, stop."""

    def __init__(self, database: str, policy_path: str | None, refresh: float) -> None:
        self.database = database
        self.policy_path = policy_path
        self.refresh = refresh
        self.lost_notes = 0
        self._proc: subprocess.Popen | None = None
        self._fd = -1
        self._sent: dict[str, object] = {}

    def start(self) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "resolver.fence.connproc", self.database, self.policy_path or "",
             str(self.refresh)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True, start_new_session=True,
            cwd=os.getcwd())
        assert self._proc.stdin is not None and self._proc.stdout is not None
        ready, _, _ = select.select([self._proc.stdout], [], [], START_TIMEOUT)
        line = self._proc.stdout.readline().decode(errors="replace").strip() if ready else ""
        self._proc.stdout.close()
        if line != "ready":
            self._kill()
            raise OSError(line.removeprefix("error: ") or "the connection recorder did not start")
        self._fd = os.dup(self._proc.stdin.fileno())
        self._proc.stdin.close()
        os.set_blocking(self._fd, False)

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
        except BlockingIOError:
            self.lost_notes += len(fresh)
            return
        except OSError:  # the child is gone; the rows stop, DNS goes on
            self.lost_notes += len(fresh)
            return
        if len(sent) >= SENT_MAX:
            sent.clear()
        for ip in fresh:
            sent[ip] = name

    def stop(self, timeout: float = 10.0) -> None:
        if self._proc is None:
            return
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._kill()
        self._proc = None

    close = stop

    def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(5)


# ------------------------------------------------------------------ the child

class _Control:
    """Reads name frames from stdin; re-reads the policy when its file changes."""

    def __init__(self, fd: int, policy_path: str | None) -> None:
        self.fd = fd
        self.buf = b""
        self.names: dict[str, object] = {}
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
            if len(names) > NAMES_MAX:
                names.clear()
            for ip in ips:
                names.pop(ip, None)  # re-insert: the dict's order is recency
                names[ip] = name
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
    recorder.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
