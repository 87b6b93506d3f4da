#!/usr/bin/env python3
"""The least a CPython forwarder can do per query: a measuring stick for scenario d, not a resolver.

    scripts/floor_forwarder.py --listen 127.0.0.1:5300 --upstream 127.0.0.1:5301

Each query is received (on the same event loop dnsguard runs: uvloop when installed), given
the next 16-bit ID, sent on one connected socket to the upstream, and the reply is sent back
with the client's ID restored. Nothing else: no parsing, no policy, no cache, no log, no
random ports or IDs, no check that the reply answers the question. Whatever dnsguard spends per
miss beyond this figure is its own work; what this spends is the interpreter's and the kernel's
(two receives, two sends) -- the part no Python code can remove. `scripts/bench --floor` runs it
beside dnsguard on the same CPU and upstream (docs/performance.md, "Issue #15: the floor").

Loopback only: it refuses any other address, like the rest of the bench.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import socket
import sys

try:
    import uvloop
except ImportError:  # the stock loop, as dnsguard would use
    uvloop = None


def _loopback(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not ipaddress.ip_address(host).is_loopback:
        raise argparse.ArgumentTypeError(f"{text}: loopback addresses only")
    return host, int(port)


class _Client(asyncio.DatagramProtocol):
    def __init__(self, up: socket.socket) -> None:
        self.up = up
        self.pending: dict[int, tuple[bytes, tuple]] = {}  # our ID -> (client's ID, client address)
        self.next_id = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.sendto = transport.sendto  # type: ignore[attr-defined]

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        if len(data) < 12:
            return
        qid = self.next_id = (self.next_id + 1) & 0xFFFF
        self.pending[qid] = (data[:2], addr)  # 65,536 slots at most: an unanswered one is overwritten
        try:
            self.up.send(qid.to_bytes(2, "big") + data[2:])
        except OSError:
            self.pending.pop(qid, None)

    def reply(self) -> None:
        try:
            data = self.up.recv(65535)
        except OSError:
            return
        if len(data) < 12:
            return
        waiting = self.pending.pop(int.from_bytes(data[:2], "big"), None)
        if waiting is not None:
            self.sendto(waiting[0] + data[2:], waiting[1])


async def serve(listen: tuple[str, int], upstream: tuple[str, int]) -> None:
    loop = asyncio.get_running_loop()
    up = socket.socket(socket.AF_INET6 if ":" in upstream[0] else socket.AF_INET, socket.SOCK_DGRAM)
    up.setblocking(False)
    up.connect(upstream)
    _, proto = await loop.create_datagram_endpoint(lambda: _Client(up), local_addr=listen)
    loop.add_reader(up.fileno(), proto.reply)
    print(f"floor_forwarder: listening on {listen[0]}:{listen[1]}", file=sys.stderr, flush=True)
    await asyncio.Event().wait()  # until SIGTERM


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--listen", type=_loopback, required=True, help="HOST:PORT (loopback)")
    p.add_argument("--upstream", type=_loopback, required=True, help="HOST:PORT (loopback)")
    a = p.parse_args(argv)
    if uvloop is not None:
        uvloop.run(serve(a.listen, a.upstream))
    else:
        asyncio.run(serve(a.listen, a.upstream))


if __name__ == "__main__":
    main()
