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

import sys
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
    def __init__(self, feeder: SetFeeder, recorder: Any = None, refresh: float = REFRESH_INTERVAL) -> None:
        self.feeder = feeder
        self.recorder = recorder
        self.refresh = refresh
        self.feeds = 0  # answers whose addresses went to the sets (metrics)

    def feed(self, entry: Fed, qname: bytes, now: float) -> None:
        if now - entry.fed_at < self.refresh:
            return
        entry.fed_at = now
        self.feeds += 1
        age = int(now - entry.stored)
        # The wire name goes as is: the NFLOG recorder turns it into text off the hot path.
        self.feeder.feed([(ip, ttl - age) for ip, ttl in entry.addrs], qname)

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
        if self.recorder is not None:
            self.recorder.stop()
        self.feeder.close()


def make_feeder(config: Config, querylog: Any = None) -> Fence:
    """Open the sets (creating them if `firewall apply` has not run yet) and the NFLOG reader."""
    fw = config.firewall
    feeder = SetFeeder(fw.min_ttl, fw.max_ttl)
    feeder.ensure_sets()
    recorder = None
    if config.log.enabled:
        from resolver.fence.nflog import NflogError, NflogRecorder

        recorder = NflogRecorder(config.log.database, name_of=feeder.names.get)
        try:
            recorder.start()
        except (NflogError, OSError) as exc:
            # DNS and the sets still work; only the record of blocked attempts is missing.
            print(f"dnsguard: cannot read NFLOG, blocked connections will not be recorded: {exc}",
                  file=sys.stderr, flush=True)
            recorder = None
    return Fence(feeder, recorder)
