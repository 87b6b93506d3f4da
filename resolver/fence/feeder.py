"""The query path's firewall step: answers feed the kernel sets, attempts get recorded.

``Fence.feed`` is called by the chain for every answer that carries addresses
(cache hits included) *before* the answer is returned, so an agent never
connects to an address the kernel does not allow yet. A cache entry refreshes
its set entries at most once a second: the set timeout is the record's
remaining TTL clamped to ``[firewall] min_ttl``/``max_ttl``, never shorter than
what the client was told, so a once-a-second refresh keeps the set ahead of
every client's cache while costing one netlink datagram per second per hot
name instead of one per answer.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any, Protocol

from resolver.fence.ipsets import SetFeeder
from resolver.policy.config import Config

REFRESH_INTERVAL = 1.0


class Fed(Protocol):
    """What the fence reads of a cache entry (``resolver.dns.cache.Entry``), a sibling layer's type."""

    fed_at: float
    stored: float
    addrs: tuple[tuple[str, int], ...]


class Fence:
    def __init__(self, feeder: SetFeeder, recorder: Any = None, refresh: float = REFRESH_INTERVAL,
                 connections: Any = None) -> None:
        self.feeder = feeder
        self.recorder = recorder
        self.connections = connections  # the conntrack recorder's process, if running
        self.refresh = refresh
        self.feeds = 0  # answers whose addresses went to the sets (metrics)

    def feed(self, entry: Fed, qname: bytes, now: float, ttl: int | None = None) -> None:
        """``ttl``: what the client is told for every address instead of the entry's remaining TTL
        (a stale answer's 30 s)."""
        if now - entry.fed_at < self.refresh:
            return
        entry.fed_at = now
        self.feeds += 1
        if ttl is None:
            age = int(now - entry.stored)
            addrs = [(ip, left - age) for ip, left in entry.addrs]
        else:
            addrs = [(ip, ttl) for ip, _ in entry.addrs]
        # The wire name goes as is: the recorders turn it into text off the hot path.
        self.feeder.feed(addrs, qname)
        if self.connections is not None:  # before the answer leaves, like the set entries
            self.connections.note(addrs, qname)

    def set_entries(self) -> dict[str, int]:
        """Entries per family ("ipv4"/"ipv6"), asked over a socket of the caller's own.

        The feeder's socket belongs to the event loop; a scrape runs in another thread.
        """
        f = self.feeder
        out = {}
        with SetFeeder(set4=f.set4, set6=f.set6, netns=f.netns) as reader:
            for family, name in (("ipv4", f.set4), ("ipv6", f.set6)):
                info = reader.info(name)
                if info is not None and info.entries is not None:
                    out[family] = info.entries
        return out

    def set_ttl_bounds(self, min_ttl: int, max_ttl: int) -> None:
        """[firewall] min_ttl/max_ttl changed by a reload: later set entries use the new clamps."""
        self.feeder.set_ttl_bounds(min_ttl, max_ttl)

    def close(self) -> None:
        if self.connections is not None:
            self.connections.stop()
        if self.recorder is not None:
            self.recorder.stop()
        self.feeder.close()


def make_feeder(config: Config, querylog: Any = None, config_of: Callable[[], Config] | None = None) -> Fence:
    """Open the sets (creating them if `firewall apply` has not run yet), the NFLOG reader
    (blocked attempts, a thread) and the conntrack recorder (every flow let through, a
    process of its own: resolver.fence.connproc).

    `config_of` returns the running policy (it changes on reload); the client of a blocked
    attempt comes from it. The recorder process reads the policy file itself.
    """
    fw = config.firewall
    feeder = SetFeeder(fw.min_ttl, fw.max_ttl)
    feeder.ensure_sets()
    recorder = connections = None
    if config.log.enabled:
        from resolver.fence.connproc import ConnRecorderProcess
        from resolver.fence.describe import policy_describer
        from resolver.fence.nflog import NflogError, NflogRecorder

        current = config_of or (lambda: config)
        describe = policy_describer(current)
        if fw.record_connections:
            policy_path = config.path if config.path and os.path.exists(config.path) else None
            connections = ConnRecorderProcess(config.log.database, policy_path, fw.connection_refresh)
            try:
                connections.start()
            except OSError as exc:
                print(f"dnsguard: cannot read conntrack, allowed connections will not be recorded: {exc}",
                      file=sys.stderr, flush=True)
                connections = None
        recorder = NflogRecorder(config.log.database, name_of=feeder.names.get,
                                 client_of=lambda ip: describe(ip, ip, None, False)[0],
                                 skip_audit=connections is not None)
        try:
            recorder.start()
        except (NflogError, OSError) as exc:
            # DNS and the sets still work; only the record of blocked attempts is missing.
            print(f"dnsguard: cannot read NFLOG, blocked connections will not be recorded: {exc}",
                  file=sys.stderr, flush=True)
            recorder = None
    return Fence(feeder, recorder, connections=connections)
