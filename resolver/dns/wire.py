"""The DNS wire format on the server side: reading queries, writing local answers.

This is the only module that knows the byte layout of what clients send and
what dnsguard builds itself. It works on ``bytes`` directly instead of building
message objects: parsing one query this way costs about a microsecond, where
dnslib or dnspython cost 10-25 us per message (measured; see README/design).
It is strict -- exactly one question, no compression in it, label and name
lengths checked, nothing after the question but one OPT record -- so anything
the fast path accepts is a query a full parser would also accept.

Answers built here echo the client's question bytes exactly (clients that
randomise letter case, "0x20", check them) and carry the client's ID.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator

# RCODEs
NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5
BADVERS = 16  # extended rcode, carried half in the OPT record (RFC 6891)

# Types and classes that get special handling
TYPE_A, TYPE_CNAME, TYPE_SOA, TYPE_AAAA, TYPE_OPT = 1, 5, 6, 28, 41
TYPE_SVCB, TYPE_HTTPS, TYPE_ANY, TYPE_HINFO, TYPE_TXT = 64, 65, 255, 13, 16
CLASS_IN = 1

# Extended DNS Error info-codes (RFC 8914)
EDE_BLOCKED, EDE_PROHIBITED, EDE_NO_REACHABLE_AUTHORITY, EDE_NOT_SUPPORTED = 15, 18, 22, 21
EDE_STALE_ANSWER, EDE_NETWORK_ERROR = 3, 23

# What dnsguard advertises and the most it sends over UDP: 1232 avoids IP fragmentation
# (DNS Flag Day 2020), which is also what keeps off-path spoofing of fragments out.
EDNS_PAYLOAD = 1232

_QD1 = b"\x00\x01\x00\x00\x00\x00\x00\x00"
_QD1_AR1 = b"\x00\x01\x00\x00\x00\x00\x00\x01"
_H = struct.Struct(">H")


class BadQuery(Exception):
    """A packet the server must not treat as a normal query.

    ``rcode`` is what to answer with (FORMERR, NOTIMP, BADVERS) or None to drop the
    packet silently (unreadable header, or a response: answering responses lets two
    resolvers bounce packets at each other forever).
    """

    __slots__ = ("rcode", "reason", "question_end", "name_end")

    def __init__(self, rcode: int | None, reason: str, question_end: int = 0, name_end: int = 0) -> None:
        self.rcode = rcode
        self.reason = reason
        # For BADVERS: where the (valid) question ends, so it can be echoed.
        self.question_end = question_end
        # Where a well-formed question name ends (0 if none was read): logged as evidence.
        self.name_end = name_end
        super().__init__(reason)


def parse_query(data: bytes) -> tuple[int, int, int, int, int, int]:
    """Parse a query packet.

    Returns ``(name_end, qend, qtype, qclass, udp_size, do)``:
    the question name is ``data[12:name_end]``, the whole question is
    ``data[12:qend]``; ``udp_size`` is 0 when the query carried no EDNS, else the
    client's payload size (at least 512); ``do`` is 0x80 when the DNSSEC OK bit was set.
    Raises BadQuery otherwise.
    """
    n = len(data)
    if n < 12:
        raise BadQuery(None, "shorter than a DNS header")
    flags = data[2]
    if flags & 0x80:
        raise BadQuery(None, "QR=1 (a response, not a query)")
    if flags & 0x78:
        raise BadQuery(NOTIMP, f"opcode {(flags >> 3) & 0xF} is not QUERY")
    counts = data[4:12]
    if counts == _QD1:
        edns = False
    elif counts == _QD1_AR1:
        edns = True
    else:
        qd = (data[4] << 8) | data[5]
        raise BadQuery(FORMERR, f"QDCOUNT={qd}" if qd != 1 else "unexpected records in a query")
    i = 12
    try:
        length = data[i]
        while length:
            if length > 63:
                # 0xC0 is a compression pointer: in the first name of a message there
                # is nothing legitimate to point to, and refusing it rules out loops.
                raise BadQuery(FORMERR, "compression pointer or bad label type in question"
                               if length & 0xC0 else "label longer than 63 octets")
            i += length + 1
            length = data[i]
    except IndexError:
        raise BadQuery(FORMERR, "question name runs past the packet") from None
    name_end = i + 1
    if name_end - 12 > 255:
        raise BadQuery(FORMERR, "question name longer than 255 octets")
    qend = name_end + 4
    if qend > n:
        raise BadQuery(FORMERR, "question truncated", 0, name_end)
    qtype = (data[name_end] << 8) | data[name_end + 1]
    qclass = (data[name_end + 2] << 8) | data[name_end + 3]
    if not edns:
        if qend != n:
            raise BadQuery(FORMERR, "trailing bytes after the question", 0, name_end)
        return name_end, qend, qtype, qclass, 0, 0
    # One additional record, which must be an OPT owned by the root.
    if n < qend + 11 or data[qend] != 0 or data[qend + 1] != 0 or data[qend + 2] != TYPE_OPT:
        raise BadQuery(FORMERR, "additional record is not an OPT", 0, name_end)
    rdlen = (data[qend + 9] << 8) | data[qend + 10]
    if qend + 11 + rdlen != n:
        raise BadQuery(FORMERR, "OPT record length does not match the packet", 0, name_end)
    if data[qend + 6]:
        raise BadQuery(BADVERS, f"EDNS version {data[qend + 6]}", qend, name_end)
    size = (data[qend + 3] << 8) | data[qend + 4]
    return name_end, qend, qtype, qclass, size if size > 512 else 512, data[qend + 7] & 0x80


# ---------------------------------------------------------------- building answers

def opt_record(do: int, ede: bytes = b"", ext_rcode: int = 0) -> bytes:
    """An OPT pseudo-record advertising EDNS_PAYLOAD, echoing DO, with optional options."""
    return (b"\x00\x00\x29" + _H.pack(EDNS_PAYLOAD) + bytes((ext_rcode, 0, do, 0))
            + _H.pack(len(ede)) + ede)


# The plain client-facing OPT, by DO bit: built once, appended to most answers.
PLAIN_OPT = {0: b"", 0x80: b""}


def ede_option(info_code: int, text: str) -> bytes:
    """An Extended DNS Error option (RFC 8914): code 15, info-code, UTF-8 text."""
    body = _H.pack(info_code) + text.encode("utf-8")
    return b"\x00\x0f" + _H.pack(len(body)) + body


def response_flags(data: bytes, rcode: int, aa: bool = False) -> bytes:
    """Flags for an answer to ``data``: QR, RA, client's RD and CD copied, rcode."""
    return bytes((0x80 | (0x04 if aa else 0) | (data[2] & 0x01), 0x80 | (data[3] & 0x10) | (rcode & 0xF)))


def local_answer(data: bytes, qend: int, rcode: int, udp_size: int, do: int, opt: bytes | None = None,
                 answer: bytes = b"", ancount: int = 0) -> bytes:
    """A locally built answer that echoes the client's question exactly.

    ``opt`` is the client-facing OPT record to append when the query had EDNS
    (``udp_size`` > 0); when None a plain OPT is built.
    """
    if udp_size:
        if opt is None:
            opt = PLAIN_OPT[do]
        return (data[:2] + response_flags(data, rcode) + b"\x00\x01" + _H.pack(ancount) + b"\x00\x00\x00\x01"
                + data[12:qend] + answer + opt)
    return (data[:2] + response_flags(data, rcode) + b"\x00\x01" + _H.pack(ancount) + b"\x00\x00\x00\x00"
            + data[12:qend] + answer)


def error_answer(data: bytes, rcode: int) -> bytes:
    """A header-only answer (FORMERR / NOTIMP) for a packet whose question can't be trusted.

    RFC 1035 4.1.1: ID, opcode and RD are copied. RA only for opcode QUERY, the only one
    recursion is defined for (an answer to NOTIFY/UPDATE/STATUS claiming it is wrong, as
    EDNS-compliance testers flag); AA, TC, Z, AD and CD are never echoed.
    """
    flags = data[2]
    ra = 0 if flags & 0x78 else 0x80
    return data[:2] + bytes((0x80 | (flags & 0x79), ra | (rcode & 0xF))) + b"\x00" * 8


def badvers_answer(data: bytes, qend: int) -> bytes:
    """RFC 6891 6.1.3: BADVERS is rcode 16 = extended rcode 1 in the OPT, low bits 0."""
    return local_answer(data, qend, 0, 512, 0, opt_record(0, ext_rcode=1))


# RFC 8482: ANY is answered with one synthesised HINFO record, TTL 3600, owner = question name.
HINFO_RFC8482 = (b"\xc0\x0c" + _H.pack(TYPE_HINFO) + _H.pack(CLASS_IN) + struct.pack(">I", 3600)
                 + _H.pack(9) + b"\x07RFC8482\x00")


def truncated(resp: bytes, qend: int, udp_size: int, do: int) -> bytes:
    """The UDP form of an answer too big for the client: TC=1, question only (RFC 2181 9)."""
    head = resp[:2] + bytes((resp[2] | 0x02, resp[3])) + b"\x00\x01\x00\x00\x00\x00"
    if udp_size:
        return head + b"\x00\x01" + resp[12:qend] + PLAIN_OPT[do]
    return head + b"\x00\x00" + resp[12:qend]


PLAIN_OPT.update({do: opt_record(do) for do in (0, 0x80)})


def build_query(qid: bytes, question: bytes, do: int) -> bytes:
    """A fresh upstream query: our own ID, RD=1, the question, EDNS with DO as asked."""
    opt = PLAIN_OPT.get(do)  # built once per DO bit, not per miss
    return qid + b"\x01\x00" + _QD1_AR1 + question + (opt if opt is not None else opt_record(do))


def tcp_frames(buf: bytearray) -> Iterator[bytes]:
    """The complete DNS-over-TCP messages (a two-byte length, then the message: RFC 1035
    4.2.2) at the front of ``buf``, each removed as it is taken; a partial one stays."""
    while len(buf) >= 2:
        size = (buf[0] << 8) | buf[1]
        if len(buf) < 2 + size:
            return
        msg = bytes(buf[2:2 + size])
        del buf[:2 + size]
        yield msg


# ---------------------------------------------------------------- reading answers

def skip_name(data: bytes, i: int) -> int:
    """Offset just past a (possibly compressed) name starting at ``i``."""
    while True:
        length = data[i]
        if length == 0:
            return i + 1
        if length & 0xC0 == 0xC0:
            return i + 2
        if length > 63:
            raise ValueError("bad label type")
        i += length + 1


def record_ttls(data: bytes, start: int, count: int) -> tuple[list[int], list[int], int]:
    """Walk ``count`` resource records from ``start``; return (ttl offsets, ttls, end).

    OPT pseudo-records are skipped: their "TTL" field holds flags, not a TTL.
    """
    offsets: list[int] = []
    ttls: list[int] = []
    i = start
    for _ in range(count):
        i = skip_name(data, i)
        rtype = (data[i] << 8) | data[i + 1]
        if rtype != TYPE_OPT:
            offsets.append(i + 4)
            ttls.append(int.from_bytes(data[i + 4:i + 8], "big") & 0x7FFFFFFF)
        rdlen = (data[i + 8] << 8) | data[i + 9]
        i += 10 + rdlen
        if i > len(data):
            raise ValueError("record runs past the message")
    return offsets, ttls, i


def read_name(data: bytes, i: int) -> tuple[bytes, int]:
    """Decompress the name at ``i``: (lower-cased wire name, offset just past it in place)."""
    out = bytearray()
    end = -1
    hops = 0
    while True:
        length = data[i]
        if length == 0:
            out.append(0)
            if end < 0:
                end = i + 1
            break
        if length & 0xC0 == 0xC0:
            if end < 0:
                end = i + 2
            hops += 1
            target = ((length & 0x3F) << 8) | data[i + 1]
            # Strictly backwards (no loops, nothing into a section we cut off) and past the
            # header, which the client's answer replaces with different bytes.
            if target >= i or target < 12 or hops > 127:
                raise ValueError("compression pointer that does not point backwards")
            i = target
            continue
        if length > 63:
            raise ValueError("bad label type")
        out += data[i:i + length + 1]
        i += length + 1
        if len(out) > 255:
            raise ValueError("name longer than 255 octets")
    return bytes(out).lower(), end


def is_subdomain(name: bytes, parent: bytes) -> bool:
    """Is wire name ``name`` equal to or below ``parent`` (label-aligned)?"""
    if not name.endswith(parent):
        return False
    cut = len(name) - len(parent)
    i = 0
    while i < cut:
        i += name[i] + 1
    return i == cut


def svcb_hints(data: bytes, start: int, end: int) -> list[str]:
    """ipv4hint / ipv6hint addresses of an SVCB/HTTPS record's RDATA (RFC 9460)."""
    i = start + 2
    while data[i]:  # the target name is never compressed (RFC 9460 2.2)
        if data[i] > 63:
            raise ValueError("compressed or malformed SVCB target name")
        i += data[i] + 1
    i += 1
    out = []
    while i + 4 <= end:
        key, length = (data[i] << 8) | data[i + 1], (data[i + 2] << 8) | data[i + 3]
        i += 4
        if key in (4, 6):
            size, family = (4, socket.AF_INET) if key == 4 else (16, socket.AF_INET6)
            for j in range(i, i + length - size + 1, size):
                out.append(socket.inet_ntop(family, data[j:j + size]))
        i += length
    return out
