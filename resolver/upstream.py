"""Asking the upstream resolvers, and cleaning what they say.

Every upstream query is built afresh from the parsed question (the client's
packet is never relayed, so nothing it smuggled in reaches upstream) with a
random ID from ``os.urandom`` and a fresh socket per query, so the kernel picks
a random source port. A reply counts only if it comes from the server asked
(connected socket), carries our ID, and echoes our question; anything else is
ignored while we keep waiting, so a spoofed packet cannot end the wait early.

Failover: servers are tried in order, each with a share of the overall
deadline; a timeout, ICMP refusal, SERVFAIL, REFUSED or an unparseable reply
moves on. A truncated UDP reply is asked again over TCP. When all fail the
caller gets UpstreamError and answers SERVFAIL -- never a hang.

Cleaning uses dnspython (only on cache misses, where its cost is small next to
the network round trip): answer records not on the CNAME chain from the
question, and everything in the additional section, are dropped before the
answer is cached or relayed.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
from dataclasses import dataclass

import dns.exception
import dns.message
import dns.name
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.svcbbase
import dns.renderer
import dns.rrset

from . import wire
from .errors import UpstreamError

HostPort = tuple[str, int]
_RETRY_RCODES = frozenset((wire.SERVFAIL, wire.REFUSED, wire.NOTIMP, wire.FORMERR))
_KEEP_AUTHORITY = frozenset((dns.rdatatype.SOA, dns.rdatatype.NSEC, dns.rdatatype.NSEC3,
                             dns.rdatatype.RRSIG))


class Upstream:
    """A list of upstream servers with failover and a shared deadline."""

    def __init__(self, servers: tuple[HostPort, ...], timeout: float) -> None:
        if not servers:
            raise UpstreamError("no upstream servers configured (and none in /etc/resolv.conf)")
        self.servers = tuple(servers)
        self.timeout = timeout

    async def query(self, question: bytes, name_len: int, do: int) -> bytes:
        """Resolve ``question`` (lower-cased name + type + class); return the raw reply."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        reasons = []
        for idx, server in enumerate(self.servers):
            left = deadline - loop.time()
            if left <= 0:
                reasons.append(f"{_fmt(server)}: no time left")
                break
            # Share what is left between the servers not yet tried.
            budget = left / (len(self.servers) - idx)
            qid = os.urandom(2)
            packet = wire.build_query(qid, question, do)
            try:
                async with asyncio.timeout(budget):
                    reply = await _udp(server, packet, qid, question, name_len)
                    if reply[2] & 0x02:  # TC: the full answer only fits over TCP
                        reply = await _tcp(server, packet, qid, question, name_len)
            except TimeoutError:
                reasons.append(f"{_fmt(server)}: timeout")
                continue
            except (OSError, ValueError) as exc:
                reasons.append(f"{_fmt(server)}: {exc.__class__.__name__}: {exc}")
                continue
            rcode = reply[3] & 0x0F
            if rcode in _RETRY_RCODES:
                reasons.append(f"{_fmt(server)}: rcode {rcode}")
                continue
            return reply
        raise UpstreamError("; ".join(reasons) or "no upstream answered")


def _fmt(server: HostPort) -> str:
    host, port = server
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _matches(reply: bytes, qid: bytes, question: bytes, name_len: int) -> bool:
    qend = 12 + len(question)
    return (len(reply) >= qend and reply[:2] == qid and reply[2] & 0x80 == 0x80
            and reply[4:6] == b"\x00\x01"
            and reply[12:12 + name_len].lower() == question[:name_len]
            and reply[12 + name_len:qend] == question[name_len:])


async def _udp(server: HostPort, packet: bytes, qid: bytes, question: bytes, name_len: int) -> bytes:
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        sock.connect(server)  # connected: the kernel drops datagrams from anyone else
        await loop.sock_sendall(sock, packet)
        while True:  # bounded by the caller's timeout
            reply = await loop.sock_recv(sock, 65535)
            if _matches(reply, qid, question, name_len):
                return reply


async def _tcp(server: HostPort, packet: bytes, qid: bytes, question: bytes, name_len: int) -> bytes:
    reader, writer = await asyncio.open_connection(server[0], server[1])
    try:
        writer.write(struct.pack(">H", len(packet)) + packet)
        await writer.drain()
        while True:  # bounded by the caller's timeout
            size = struct.unpack(">H", await reader.readexactly(2))[0]
            reply = await reader.readexactly(size)
            if _matches(reply, qid, question, name_len):
                return reply
    except asyncio.IncompleteReadError:
        raise ValueError("upstream closed the TCP connection early") from None
    finally:
        writer.close()


# ---------------------------------------------------------------- cleaning replies

@dataclass(frozen=True, slots=True)
class Cleaned:
    """An upstream reply reduced to what may be relayed and cached."""

    rcode: int
    an: int
    ns: int
    ar: int
    body: bytes  # records after the question, no OPT
    offsets: list[int]  # TTL positions within body
    ttls: list[int]
    cache_ttl: int  # how long the whole answer may be cached (0 = not at all)
    answers_json: str | None
    addrs: tuple[tuple[str, int], ...]  # (ip, ttl) from A/AAAA and SVCB/HTTPS hints
    dropped: int  # records removed as off-chain/poison


def clean_reply(reply: bytes, question: bytes, negative_max_ttl: int = 3600) -> Cleaned:
    """Keep only records on the CNAME chain (plus negative-answer proof); render the body."""
    try:
        msg = dns.message.from_wire(reply, ignore_trailing=True, one_rr_per_rrset=False)
    except (dns.exception.DNSException, ValueError, IndexError) as exc:
        raise ValueError(f"unparseable upstream reply: {exc}") from None
    qname = msg.question[0].name if msg.question else dns.name.from_wire(question, 0)[0]
    qtype = msg.question[0].rdtype if msg.question else dns.rdatatype.A

    owners = {qname}
    kept: set[int] = set()
    pending = list(enumerate(msg.answer))
    changed = True
    while changed:  # the chain may be listed out of order; bounded by the section size
        changed = False
        for idx, rrset in list(pending):
            on_chain = rrset.name in owners
            if not on_chain and rrset.rdtype == dns.rdatatype.DNAME:
                on_chain = any(o.is_subdomain(rrset.name) for o in owners)
            if not on_chain:
                continue
            kept.add(idx)
            pending.remove((idx, rrset))
            if rrset.rdtype == dns.rdatatype.CNAME:
                for rd in rrset:
                    if rd.target not in owners:
                        owners.add(rd.target)
                        changed = True
    answer = [rr for i, rr in enumerate(msg.answer) if i in kept]
    authority = [rr for rr in msg.authority
                 if rr.rdtype in _KEEP_AUTHORITY and any(o.is_subdomain(rr.name) for o in owners)]
    dropped = (sum(len(rr) for rr in msg.answer) - sum(len(rr) for rr in answer)
               + sum(len(rr) for rr in msg.authority) - sum(len(rr) for rr in authority)
               + sum(len(rr) for rr in msg.additional))

    renderer = dns.renderer.Renderer(0, 0x8180)
    renderer.add_question(qname, qtype, dns.rdataclass.IN)
    for rr in answer:
        renderer.add_rrset(dns.renderer.ANSWER, rr)
    for rr in authority:
        renderer.add_rrset(dns.renderer.AUTHORITY, rr)
    renderer.write_header()
    rendered = renderer.get_wire()
    qend = 12 + len(question)
    an = (rendered[6] << 8) | rendered[7]
    ns = (rendered[8] << 8) | rendered[9]
    offsets, ttls, _ = wire.record_ttls(rendered, qend, an + ns)
    body = rendered[qend:]
    offsets = [o - qend for o in offsets]

    rcode = msg.rcode()
    chain: list[str] = []
    addrs: list[tuple[str, int]] = []
    for rr in answer:
        if rr.rdtype == dns.rdatatype.CNAME:
            chain.extend(rd.target.to_text(omit_final_dot=True).lower() for rd in rr)
        elif rr.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            for rd in rr:
                chain.append(rd.address)
                addrs.append((rd.address, rr.ttl))
        elif rr.rdtype in (dns.rdatatype.HTTPS, dns.rdatatype.SVCB):
            for rd in rr:
                for key in ("ipv4hint", "ipv6hint"):
                    param = rd.params.get(dns.rdtypes.svcbbase.ParamKey.make(key))
                    if param is not None:
                        addrs.extend((a, rr.ttl) for a in param.addresses)

    if rcode == wire.NOERROR and an:
        cache_ttl = min(ttls)
    else:
        # Negative answer (NXDOMAIN / NODATA): RFC 2308 5 -- min(SOA TTL, SOA MINIMUM).
        soa = [rr for rr in authority if rr.rdtype == dns.rdatatype.SOA]
        cache_ttl = min(min(soa[0].ttl, soa[0][0].minimum), negative_max_ttl) if soa else 0
    return Cleaned(rcode, an, ns, 0, body, offsets, ttls, cache_ttl,
                   json.dumps(chain, separators=(",", ":")) if chain else None, tuple(addrs), dropped)
