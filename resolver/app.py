"""Assembles a running dnsguard from a Config: resolver, log, fence, server, reloads.

The CLI calls ``run(options)``; tests call it through the CLI in a subprocess.
Reload (SIGHUP, or the policy file changing on disk) parses the new file
completely first; only a valid policy replaces the running one, and queries in
flight finish under the policy they started with.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
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
    if opts.mode is not None:
        changes["mode"] = opts.mode
        # An explicit --mode applies to every client, named ones included.
        changes["clients"] = tuple(replace(c, mode=opts.mode) for c in config.clients)
    return config.replace(**changes)


class App:
    def __init__(self, opts: ServeOptions) -> None:
        self.opts = opts
        self.config = apply_overrides(load_config(opts.policy_path), opts)
        if not self.config.upstream.servers:
            raise DnsguardError("no upstream servers: set [upstream] servers or --upstream "
                                "(/etc/resolv.conf lists none besides dnsguard itself)")
        self.querylog: Any = None
        self.feeder: Any = None
        self.notifier = Notifier()
        self._mtime = self._stat()

    def _stat(self) -> tuple[float, int] | None:
        try:
            st = os.stat(self.opts.policy_path)
        except OSError:
            return None
        return st.st_mtime, st.st_size

    def reload(self, reason: str = "SIGHUP") -> bool:
        # systemd holds `systemctl reload` until READY=1 follows RELOADING=1, accepted or not.
        self.notifier.reloading()
        try:
            return self._reload(reason)
        finally:
            self.notifier.ready(f"policy mode {self.config.mode}, {self.config.matcher.rule_count} rules")

    def _reload(self, reason: str) -> bool:
        try:
            new = apply_overrides(load_config(self.opts.policy_path), self.opts)
            if not new.upstream.servers:
                raise DnsguardError("no upstream servers left in the new policy")
        except Exception as exc:  # whatever is wrong with the new file, the running policy stays
            print(f"dnsguard: policy reload ({reason}) rejected, keeping the running policy: {exc}",
                  file=sys.stderr, flush=True)
            return False
        self.config = new
        self.resolver.use(new)
        if self.querylog is not None:
            # Off the loop: a busy database must not stall answers.
            asyncio.get_running_loop().run_in_executor(
                None, record_policy, new.log.database, new.text, new.sha256, new.path)
        print(f"dnsguard: policy reloaded ({reason}): {new.matcher.rule_count} rules, mode {new.mode}",
              file=sys.stderr, flush=True)
        return True

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
                                       retention_days=cfg.log.retention_days,
                                       docker_socket=cfg.docker.socket)
            self.querylog.start()
            # Every policy served is kept, so `dnsguard policy rollback` can restore it byte for byte.
            record_policy(cfg.log.database, cfg.text, cfg.sha256, cfg.path)
        if cfg.firewall.enabled:
            from resolver.fence.feeder import make_feeder

            self.feeder = make_feeder(cfg, self.querylog)
        self.resolver = Resolver(cfg, submit=self.querylog.submit if self.querylog else None,
                                 feeder=self.feeder)
        server = DnsServer(cfg, self.resolver, on_reload=self.reload, on_stop=self.notifier.stopping)
        tasks: list[asyncio.Task] = []
        try:
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
                for task in tasks:
                    task.cancel()
                    with contextlib.suppress(BaseException):
                        await task
                if self.feeder is not None:
                    self.feeder.close()
                self.resolver.upstream.close()
                self.notifier.close()
            finally:
                if self.querylog is not None:
                    # Drain off the loop thread: the writer may need a moment to commit.
                    self.querylog.stop_flushing()
                    await asyncio.get_running_loop().run_in_executor(None, self.querylog.close)
        return 0


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
