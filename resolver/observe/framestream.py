"""A Frame Streams sender (bidirectional handshake) over a unix or TCP socket.

    sender -> READY(content type)   receiver -> ACCEPT(content type)
    sender -> START(content type)   data frames ...
    sender -> STOP                  receiver -> FINISH

Blocking sockets with deadlines: this runs in the dnstap writer thread, never on the event
loop. Frames are encoded with the ``fstrm`` package's codec.
"""

from __future__ import annotations

import socket
import time

import fstrm

from resolver.core.errors import DnsguardError
from resolver.policy.config import parse_hostport

CONTENT_TYPE = b"protobuf:dnstap.Dnstap"
IO_TIMEOUT = 5.0


class FrameStreamError(DnsguardError):
    """The receiver broke the Frame Streams protocol (or closed mid-handshake)."""


def open_socket(address: str, timeout: float = IO_TIMEOUT) -> socket.socket:
    """Connect to ``unix:/path`` or ``tcp:host:port``."""
    if address.startswith("unix:"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target: object = address[5:]
    else:
        host, port = parse_hostport(address[4:], 0)
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        target = (host, port)
    sock.settimeout(timeout)
    try:
        sock.connect(target)
    except BaseException:
        sock.close()
        raise
    return sock


def _read_control(sock: socket.socket, want: int, deadline: float) -> None:
    codec = fstrm.FstrmCodec()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise FrameStreamError("no control frame from the receiver in time")
        sock.settimeout(left)
        chunk = sock.recv(codec.pending_nb_bytes())
        if not chunk:
            raise FrameStreamError("the receiver closed the connection during the handshake")
        if codec.append_and_process(chunk):
            try:
                ctrl, types, _ = codec.decode()
            except Exception as exc:  # the codec raises bare Exception on a bad content-type field
                raise FrameStreamError(f"bad control frame: {exc}") from None
            if ctrl != want:
                raise FrameStreamError(f"expected control frame {want}, got {ctrl}")
            if want == fstrm.FSTRM_CONTROL_ACCEPT and types and CONTENT_TYPE not in types:
                raise FrameStreamError(f"the receiver accepts {types!r}, not {CONTENT_TYPE!r}")
            return


class Sender:
    """One Frame Streams session: ``open`` does the handshake, ``send`` writes data frames."""

    def __init__(self, address: str, timeout: float = IO_TIMEOUT) -> None:
        self.address = address
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.codec = fstrm.FstrmCodec()

    def open(self) -> None:
        sock = open_socket(self.address, self.timeout)
        try:
            deadline = time.monotonic() + self.timeout
            sock.sendall(self.codec.encode_ctrlready(CONTENT_TYPE))
            _read_control(sock, fstrm.FSTRM_CONTROL_ACCEPT, deadline)
            sock.sendall(self.codec.encode_ctrlstart(CONTENT_TYPE))
            sock.settimeout(self.timeout)
        except BaseException:
            sock.close()
            raise
        self.sock = sock

    def send(self, payloads: list[bytes]) -> None:
        assert self.sock is not None
        enc = self.codec.encode_data
        self.sock.sendall(b"".join(enc(p) for p in payloads))

    def close(self, graceful: bool = True) -> None:
        sock, self.sock = self.sock, None
        if sock is None:
            return
        try:
            if graceful:
                sock.sendall(self.codec.encode(ctrl=fstrm.FSTRM_CONTROL_STOP))
                _read_control(sock, fstrm.FSTRM_CONTROL_FINISH, time.monotonic() + min(self.timeout, 2.0))
        except (OSError, FrameStreamError):
            pass  # the receiver went away first: nothing left to tell it
        finally:
            sock.close()
