"""Assembles a running dnsguard from a Config: resolver, log, fence, server, reloads.

The CLI calls ``run(options)``; tests call it through the CLI in a subprocess.
Reload (SIGHUP, or the policy file changing on disk) parses the new file
completely first; only a valid policy replaces the running one, and queries in
flight finish under the policy they started with.

The parse runs in a worker thread, never on the event loop: a 1,000,000-name policy
takes seconds to compile, and every query meanwhile is answered under the old policy.
The parser keeps each C-level step short (see ``resolver.policy``), so the GIL changes
hands often enough for the loop; the swap itself is a few assignments on the loop, and
the old policy is freed back in the thread. What can change without a restart is
applied at the swap: [server] clients, rate_limit and TCP limits, [upstream], [cache],
[log] retention/size/queue bounds, [firewall] TTL clamps. What cannot is named on
stderr, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from resolver.core.errors import DnsguardError
from resolver.core.notify import Notifier
from resolver.dns.chain import Resolver
from resolver.dns.server import DnsServer
from resolver.policy.config import Config, load_config, resolv_conf_servers, without_self
from resolver.policy.history import record_policy

try:  # uvloop's UDP path costs a fraction of the stock selector loop's per datagram
    import uvloop
except ImportError:  # pragma: no cover - non-Linux fallback
    uvloop = None


@dataclass
class ServeOptions:
    policy_path: str
    listen: tuple[tuple[str, int], ...] = ()
    mode: str | None = None
    upstream: tuple[tuple[str, int], ...] = ()
    db: str | None = None
    log_enabled: bool | None = None
    firewall: bool | None = None
    watch_interval: float = 1.0
    metrics: tuple[str, int] | None = None  # --metrics HOST:PORT
    dnstap: str | None = None  # --dnstap unix:/PATH | tcp:HOST:PORT
    extra: dict[str, Any] = field(default_factory=dict)


def apply_overrides(config: Config, opts: ServeOptions) -> Config:
    """Command-line options win over the policy file."""
    server, upstream, log, firewall = config.server, config.upstream, config.log, config.firewall
    if opts.listen:
        server = replace(server, listen=opts.listen)
    if opts.upstream:
        upstream = replace(upstream, servers=opts.upstream, from_resolv_conf=False)
    elif upstream.from_resolv_conf and opts.listen:
        # --listen may put dnsguard where resolv.conf points: never forward to ourselves.
        upstream = replace(upstream, servers=without_self(resolv_conf_servers(), opts.listen))
    if opts.db is not None:
        log = replace(log, database=opts.db)
    if opts.log_enabled is not None:
        log = replace(log, enabled=opts.log_enabled)
    if opts.firewall is not None:
        firewall = replace(firewall, enabled=opts.firewall)
    changes: dict[str, Any] = {"server": server, "upstream": upstream, "log": log, "firewall": firewall}
    if opts.metrics is not None:
        changes["metrics"] = replace(config.metrics, listen=opts.metrics)
    if opts.dnstap is not None:
        changes["dnstap"] = replace(config.dnstap, address=opts.dnstap)
    if opts.mode is not None:
        changes["mode"] = opts.mode
        # An explicit --mode applies to every client, named ones included.
        changes["clients"] = tuple(replace(c, mode=opts.mode) for c in config.clients)
    return config.replace(**changes)


RELOAD_SWITCH_INTERVAL = 0.0002


@contextlib.contextmanager
def quiet_gc() -> Iterator[None]:
    """No automatic garbage collection while a policy is built, and what exists afterwards is
    frozen out of later ones.

    Measured: building a 1,000,000-name policy in a thread triggers full collections that
    walk every object while holding the GIL -- loop stalls of 250-500 ms. The policy's
    objects form no cycles (reference counting frees an old one), so they need no collector.
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was:
            gc.enable()


class App:
    def __init__(self, opts: ServeOptions) -> None:
        self.opts = opts
        with quiet_gc():
            self.config = apply_overrides(load_config(opts.policy_path), opts)
        if not self.config.upstream.servers:
            raise DnsguardError("no upstream servers: set [upstream] servers or --upstream "
                                "(/etc/resolv.conf lists none besides dnsguard itself)")
        self.querylog: Any = None
        self.feeder: Any = None
        self.metrics: Any = None
        self.dnstap: Any = None
        self.reloads = {"ok": 0, "rejected": 0}
        self.server: DnsServer | None = None
        self.notifier = Notifier()
        self._mtime = self._stat()
        self._reloading: asyncio.Task | None = None
        self._reload_again: str | None = None
        self._restart_said: frozenset[str] = frozenset()

    def _stat(self) -> tuple[float, int] | None:
        try:
            st = os.stat(self.opts.policy_path)
        except OSError:
            return None
        return st.st_mtime, st.st_size

    def reload(self, reason: str = "SIGHUP") -> None:
        """Ask for a reload (SIGHUP handler): runs in the background, one at a time; a request
        arriving meanwhile runs once more afterwards, so the last edit always wins."""
        if self._reloading is not None:
            self._reload_again = reason
            return
        # systemd holds `systemctl reload` until READY=1 follows RELOADING=1, accepted or not.
        self.notifier.reloading()
        self._reloading = asyncio.get_running_loop().create_task(self._reload(reason))

    async def _reload(self, reason: str) -> None:
        try:
            while True:
                await self._reload_once(reason)
                if self._reload_again is None:
                    return
                reason, self._reload_again = self._reload_again, None
        finally:
            self._reloading = None
            self.notifier.ready(f"policy mode {self.config.mode}, {self.config.matcher.rule_count} rules")

    def _load_new(self) -> Config:
        """Worker thread: read, parse and compile the policy file."""
        with quiet_gc():
            new = apply_overrides(load_config(self.opts.policy_path), self.opts)
        if not new.upstream.servers:
            raise DnsguardError("no upstream servers left in the new policy")
        return new

    async def _reload_once(self, reason: str) -> bool:
        loop = asyncio.get_running_loop()
        # The parsing thread keeps the GIL for up to the switch interval each time the loop
        # asks for it (5 ms by default), and the loop asks on every wake-up: at thousands of
        # queries a second that convoy, not the parse, is the latency. Hand it over sooner.
        interval = sys.getswitchinterval()
        sys.setswitchinterval(min(interval, RELOAD_SWITCH_INTERVAL))
        try:
            new = await loop.run_in_executor(None, self._load_new)
        except Exception as exc:  # whatever is wrong with the new file, the running policy stays
            print(f"dnsguard: policy reload ({reason}) rejected, keeping the running policy: {exc}",
                  file=sys.stderr, flush=True)
            self.reloads["rejected"] += 1
            return False
        finally:
            sys.setswitchinterval(interval)
        # The swap: plain assignments, on the loop, between two queries.
        garbage = [self.config, self.resolver.use(new)]
        old, self.config = self.config, new
        if self.server is not None:
            self.server.config = new
        self._apply_runtime(old, new)
        del old
        self.reloads["ok"] += 1
        print(f"dnsguard: policy reloaded ({reason}): {new.matcher.rule_count} rules, mode {new.mode}",
              file=sys.stderr, flush=True)
        # Freeing a million-name policy takes a while too: let the thread drop the last references.
        await loop.run_in_executor(None, garbage.clear)
        if self.querylog is not None:
            # Off the loop: hashing the text and a busy database must not stall answers.
            await loop.run_in_executor(
                None, lambda: record_policy(new.log.database, new.text, new.sha256, new.path))
        return True

    def _apply_runtime(self, old: Config, new: Config) -> None:
        """Apply the settings that can change while serving; name those that need a restart."""
        ol, nl = old.log, new.log
        if self.querylog is not None and (ol.retention_days, ol.max_size_mb, ol.queue_max) != (
                nl.retention_days, nl.max_size_mb, nl.queue_max):
            self.querylog.configure(retention_days=nl.retention_days, max_size_mb=nl.max_size_mb,
                                    queue_max=nl.queue_max)
        of, nf = old.firewall, new.firewall
        if self.feeder is not None and (of.min_ttl, of.max_ttl) != (nf.min_ttl, nf.max_ttl):
            self.feeder.set_ttl_bounds(nf.min_ttl, nf.max_ttl)
        started = self._started
        sl, sf = started.log, started.firewall
        # Settings read only at start, in the order the stderr line names them.
        changed = (
            ("[server] listen", new.server.listen != started.server.listen),
            ("[log] enabled/database",
             nl.enabled != sl.enabled or (nl.enabled and nl.database != sl.database)),
            ("[firewall] enabled", nf.enabled != sf.enabled),
            ("[firewall] record_connections/connection_refresh_s",
             nf.enabled and (nf.record_connections, nf.connection_refresh)
             != (sf.record_connections, sf.connection_refresh)),
            ("[docker] socket", new.docker != started.docker),
            ("[metrics]", new.metrics != started.metrics),
            ("[dnstap]", new.dnstap != started.dnstap),
            ("[firewall] ports (run `dnsguard firewall apply` again)", nf.ports != sf.ports),
        )
        later = [label for label, differs in changed if differs]
        said = frozenset(later)
        if later and said != self._restart_said:
            print(f"dnsguard: policy reload: these changes take effect only after a restart: "
                  f"{', '.join(later)}", file=sys.stderr, flush=True)
        self._restart_said = said

    async def _watch(self) -> None:
        # Reload once the file has stopped changing for one interval: an editor (or a
        # non-atomic writer) caught mid-save could otherwise hand us a truncated file that
        # still parses -- say, with the end of its [deny] list cut off.
        seen = self._mtime
        while True:
            await asyncio.sleep(self.opts.watch_interval)
            now = self._stat()
            if now is None or now == self._mtime:
                seen = now
                continue
            if now == seen:
                self._mtime = now
                self.reload("file changed")
            seen = now

    async def _watchdog(self, interval: float) -> None:
        # A ping from the event loop itself: a wedged loop stops pinging and systemd restarts us.
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)

    async def main(self) -> int:
        cfg = self.config
        if cfg.log.enabled:
            from resolver.log.logproc import ProcessLog

            self.querylog = ProcessLog(cfg.log.database, queue_max=cfg.log.queue_max,
                                       retention_days=cfg.log.retention_days, max_size_mb=cfg.log.max_size_mb,
                                       docker_socket=cfg.docker.socket)
            self.querylog.start()
            # Every policy served is kept, so `dnsguard policy rollback` can restore it byte for byte.
            record_policy(cfg.log.database, cfg.text, cfg.sha256, cfg.path)
        if cfg.firewall.enabled:
            from resolver.fence.feeder import make_feeder

            self.feeder = make_feeder(cfg, self.querylog, config_of=lambda: self.config)
        submit = self.querylog.submit if self.querylog else None
        tap = None
        if cfg.dnstap.address is not None:
            from resolver.observe.dnstap import DnstapWriter

            t = cfg.dnstap
            self.dnstap = DnstapWriter(t.address, identity=t.identity, version=t.version,
                                       queue_max=t.queue_max, policy_of=self._policy_of())
            self.dnstap.start()
            tap = self.dnstap.sink
        self.resolver = Resolver(cfg, submit=submit, feeder=self.feeder, tap=tap)
        self._started = cfg
        server = self.server = DnsServer(cfg, self.resolver, on_reload=self.reload, tap=tap,
                                        on_stop=self.notifier.stopping)
        tasks: list[asyncio.Task] = []
        try:
            if cfg.metrics.listen is not None:
                self.resolver.counts = {}
                self._start_metrics()
            await server.start()
            loop = asyncio.get_running_loop()
            tasks.append(loop.create_task(self._watch()))
            if self.notifier.watchdog_interval is not None:
                tasks.append(loop.create_task(self._watchdog(self.notifier.watchdog_interval)))
            listening = ", ".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in server.bound)
            # READY=1 only once serve_forever has its signal handlers: systemd may send SIGHUP
            # the moment it reads READY, and before the handler that signal would kill us.
            loop.call_soon(self.notifier.ready, f"listening on {listening}; policy mode {cfg.mode}, "
                                                f"{cfg.matcher.rule_count} rules")
            await server.serve_forever()
        finally:
            try:
                for task in (*tasks, self._reloading):
                    if task is not None:
                        task.cancel()
                        with contextlib.suppress(BaseException):
                            await task
                if self.feeder is not None:
                    self.feeder.close()
                self.resolver.upstream.close()
                if self.metrics is not None:
                    self.metrics.stop()
                if self.dnstap is not None:
                    await asyncio.get_running_loop().run_in_executor(None, self.dnstap.stop)
                self.notifier.close()
            finally:
                self.resolver.close()  # rate-limit counts still held become rows before the drain
                if self.querylog is not None:
                    # Drain off the loop thread: the writer may need a moment to commit.
                    self.querylog.stop_flushing()
                    await asyncio.get_running_loop().run_in_executor(None, self.querylog.close)
        return 0

    def _start_metrics(self) -> None:
        from resolver.observe import metrics as m

        self.metrics = reg = m.Metrics()
        reg.add(m.query_reader(self.resolver))
        reg.add(m.resolver_reader(self.resolver))
        reg.add(m.policy_reader(self))
        if self.querylog is not None:
            reg.add(m.log_reader(self.querylog))
            fw = self.config.firewall
            reg.add(m.LogFigures(self.config.log.database,
                                 connections=fw.enabled and fw.record_connections))
        if self.feeder is not None:
            reg.add(m.fence_reader(self.feeder))
        if self.dnstap is not None:
            reg.add(m.dnstap_reader(self.dnstap))
        host, port = self.config.metrics.listen
        bound = reg.start(host, port)
        where = f"[{host}]:{bound}" if ":" in host else f"{host}:{bound}"
        print(f"dnsguard: metrics on http://{where}/metrics", file=sys.stderr, flush=True)

    def _policy_of(self) -> Any:
        """For the dnstap writer thread: (client, name) -> (rule, audit) when the policy denies."""
        views: dict[tuple[int, str], Any] = {}

        def policy_of(ip: str, qname: bytes) -> tuple[str | None, bool] | None:
            cfg = self.resolver.config
            key = (id(cfg), ip)
            view = views.get(key)
            if view is None:
                if len(views) >= 4096:
                    views.clear()
                view = views[key] = Resolver.view_for(cfg, ip)
            if not view.served:
                return None
            d = view.decide(qname)  # memoised per view, bounded
            return None if d.allowed else (d.rule, view.audit)
        return policy_of


def raise_fd_limit() -> None:
    """TCP clients and upstream sockets hold descriptors: take all the file descriptors we are allowed."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, OSError, ValueError):
        pass


def run(opts: ServeOptions) -> int:
    raise_fd_limit()
    app = App(opts)
    factory = uvloop.new_event_loop if uvloop is not None else None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(app.main())
