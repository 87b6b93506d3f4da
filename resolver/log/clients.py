"""Who a client address is: a Docker container's name, or a fenced local user's name.

Never on the DNS path. The log writer (a child process, see ``logproc``) asks ``ClientNames``
for each client address of a batch it writes; the answers come from memory:

* **Docker containers**: a thread lists the containers through the Docker Engine API on its
  unix socket (HTTP over AF_UNIX, stdlib only), then follows ``/events`` and lists them again
  whenever a container starts, dies, is renamed or changes networks. If Docker is not there
  (or goes away) it retries with backoff; names just stay what they were until then.
* **Fenced users**: the user-mode fence rewrites a user's redirected DNS to come from
  ``127.255.<uid>`` (``resolver.core.addrs.user_source``), which names the user.

``DockerAPI`` is also what ``dnsguard doctor`` uses to inspect a container and run its
checks inside it.
"""

from __future__ import annotations

import http.client
import json
import os
import pwd
import socket
import struct
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from resolver.core.addrs import uid_from_source
from resolver.core.errors import DnsguardError

DEFAULT_SOCKET = "/var/run/docker.sock"
# Events after which the address -> name map may have changed.
_CONTAINER_EVENTS = {"start", "die", "destroy", "rename", "restart", "unpause", "pause", "create"}
_NETWORK_EVENTS = {"connect", "disconnect"}
RETRY_MIN_S, RETRY_MAX_S = 1.0, 30.0


class DockerError(DnsguardError):
    """The Docker API could not be reached or refused a request."""


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float | None) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class DockerAPI:
    """The few Docker Engine API calls dnsguard needs, over the daemon's unix socket."""

    def __init__(self, socket_path: str = DEFAULT_SOCKET, timeout: float = 10.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def _request(self, method: str, path: str, body: Any = None,
                 timeout: float | None = -1.0) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        conn = _UnixHTTPConnection(self.socket_path, self.timeout if timeout == -1.0 else timeout)
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        try:
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
        except OSError as exc:
            conn.close()
            raise DockerError(f"Docker API at {self.socket_path}: {exc}") from None
        return conn, resp

    @staticmethod
    def _read(conn: Any, resp: Any, what: str) -> tuple[bytes, Any]:
        """The whole body of ``resp``; the connection is closed either way."""
        try:
            return resp.read(), resp
        except OSError as exc:
            raise DockerError(f"{what}: {exc}") from None
        finally:
            conn.close()

    def call(self, method: str, path: str, body: Any = None) -> Any:
        raw, resp = self._read(*self._request(method, path, body), f"Docker API at {self.socket_path}")
        if resp.status >= 400:
            try:
                message = json.loads(raw).get("message", "")
            except (ValueError, AttributeError):
                message = raw[:200].decode(errors="replace")
            raise DockerError(f"Docker API {method} {path}: {resp.status} {message}".rstrip())
        return json.loads(raw) if raw.strip() else None

    def containers(self) -> list[dict]:
        return self.call("GET", "/containers/json") or []

    def inspect(self, name: str) -> dict:
        return self.call("GET", f"/containers/{urllib.parse.quote(name, safe='')}/json")

    def events(self, types: Sequence[str] = ("container", "network")) -> Iterator[dict]:
        """Docker's event stream, one dict per event, until the daemon closes it.

        Subscribed when this returns (not at the first ``next``), so a caller can list the
        containers next and miss nothing that happens in between.
        """
        query = urllib.parse.urlencode({"filters": json.dumps({"type": list(types)})})
        conn, resp = self._request("GET", f"/events?{query}", timeout=None)
        if resp.status >= 400:
            conn.close()
            raise DockerError(f"Docker API /events: {resp.status}")
        return self._stream(conn, resp)

    @staticmethod
    def _stream(conn: http.client.HTTPConnection, resp: http.client.HTTPResponse) -> Iterator[dict]:
        try:
            while True:
                line = resp.readline()
                if not line:
                    return
                if line.strip():
                    yield json.loads(line)
        finally:
            conn.close()

    def exec(self, container: str, argv: Sequence[str], *, user: str | None = None,
             timeout: float = 30.0) -> tuple[int, str]:
        """Run argv inside a running container (like ``docker exec``): (exit code, output)."""
        spec: dict[str, Any] = {"Cmd": list(argv), "AttachStdout": True, "AttachStderr": True}
        if user:
            spec["User"] = user
        created = self.call("POST", f"/containers/{urllib.parse.quote(container, safe='')}/exec", spec)
        exec_id = created["Id"]
        raw, resp = self._read(*self._request("POST", f"/exec/{exec_id}/start",
                                              {"Detach": False, "Tty": False}, timeout=timeout),
                               f"docker exec in {container}")
        if resp.status >= 400:
            raise DockerError(f"docker exec in {container}: {resp.status} {raw[:200]!r}")
        info = self.call("GET", f"/exec/{exec_id}/json")
        return int(info.get("ExitCode") or 0), _demux(raw)


def _demux(raw: bytes) -> str:
    """Docker's multiplexed stdout/stderr stream (8-byte frame headers) -> text."""
    out, i = [], 0
    while i + 8 <= len(raw) and raw[i] in (0, 1, 2) and raw[i + 1:i + 4] == b"\0\0\0":
        (size,) = struct.unpack(">I", raw[i + 4:i + 8])
        out.append(raw[i + 8:i + 8 + size])
        i += 8 + size
    if i < len(raw):  # not multiplexed (a TTY) or trailing bytes
        out.append(raw[i:])
    return b"".join(out).decode(errors="replace")


def container_addresses(container: dict) -> dict[str, str]:
    """address -> name for one entry of ``/containers/json`` (or an inspect result)."""
    name = container.get("Name") or (container.get("Names") or ["?"])[0]
    name = name.lstrip("/")
    networks = (container.get("NetworkSettings") or {}).get("Networks") or {}
    out = {}
    for net in networks.values():
        for key in ("IPAddress", "GlobalIPv6Address"):
            addr = (net or {}).get(key)
            if addr:
                out[addr] = name
    return out


class ContainerNames:
    """address -> container name, kept current from Docker's events by a daemon thread."""

    def __init__(self, socket_path: str = DEFAULT_SOCKET, *,
                 on_change: Callable[[], None] | None = None) -> None:
        self.api = DockerAPI(socket_path)
        self.names: dict[str, str] = {}
        self.error: str | None = None
        self.generation = 0  # bumps on every change to `names`
        self.on_change = on_change
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> ContainerNames:
        self._thread = threading.Thread(target=self._run, name="dnsguard-docker-names", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def refresh(self) -> None:
        fresh: dict[str, str] = {}
        for c in self.api.containers():
            fresh.update(container_addresses(c))
        if fresh != self.names:
            self.names = fresh  # one reference swap: readers in other threads see old or new
            self.generation += 1
            if self.on_change is not None:
                self.on_change()

    def _run(self) -> None:
        delay = RETRY_MIN_S
        while not self._stop.is_set():
            try:
                if not os.path.exists(self.api.socket_path):
                    raise DockerError(f"no Docker API socket at {self.api.socket_path}")
                events = self.api.events()
                # Listing after subscribing: nothing that happens in between is missed.
                self.refresh()
                self.error = None
                delay = RETRY_MIN_S
                for ev in events:
                    if self._stop.is_set():
                        return
                    action = str(ev.get("Action") or ev.get("status") or "").split(":")[0]
                    if action in _CONTAINER_EVENTS or action in _NETWORK_EVENTS:
                        self.refresh()
            except (DockerError, OSError, ValueError, http.client.HTTPException) as exc:
                self.error = str(exc)
            self._stop.wait(delay)
            delay = min(delay * 2, RETRY_MAX_S)


def user_name(addr: str) -> str | None:
    """``user:NAME`` for a fenced user's DNS source address (see resolver.core.addrs.user_source)."""
    uid = uid_from_source(addr)
    if uid is None:
        return None
    try:
        return "user:" + pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"user:{uid}"


class ClientNames:
    """The log writer's view: ``name(addr)`` -> a container's name, ``user:NAME`` or None."""

    def __init__(self, docker_socket: str | None = None) -> None:
        self.containers: ContainerNames | None = None
        if docker_socket:
            self.containers = ContainerNames(docker_socket)
        self._users: dict[str, str | None] = {}

    def start(self) -> ClientNames:
        if self.containers is not None:
            self.containers.start()
        return self

    def stop(self) -> None:
        if self.containers is not None:
            self.containers.stop()

    def name(self, addr: str) -> str | None:
        if self.containers is not None:
            found = self.containers.names.get(addr)
            if found is not None:
                return found
        if addr.startswith("127.255."):
            if addr not in self._users:
                self._users[addr] = user_name(addr)
            return self._users[addr]
        return None


def wait_for(predicate: Callable[[], bool], timeout: float) -> bool:
    """Poll until true or the deadline (used by doctor while the log catches up)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True
