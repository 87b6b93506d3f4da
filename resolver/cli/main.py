"""The `dnsguard` command: thin click wrappers over the library.

Each command parses options, calls one library function, and turns
DnsguardError into a clean one-line error (exit 2 for bad input).
"""

from __future__ import annotations

import sys

import click

from resolver import __version__
from resolver.core.errors import DnsguardError
from resolver.core.names import text_to_wire
from resolver.policy.config import default_policy_path, load_config, parse_dnstap_address, parse_hostport


def _hostports(values: tuple[str, ...], default_port: int) -> tuple[tuple[str, int], ...]:
    out = []
    for v in values:
        try:
            out.append(parse_hostport(v, default_port))
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None
    return tuple(out)


def _dnstap_address(value: str) -> str:
    try:
        return parse_dnstap_address(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--dnstap") from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dnsguard")
def main() -> None:
    """dnsguard: the only resolver (and the only way out) for an AI agent.

    Start with `dnsguard serve`, point the agent's resolver at it, and read
    what it asked with `dnsguard report`.
    """


@main.command()
@click.option("--policy", "policy_path", type=click.Path(dir_okay=False),
              help="Policy file (default: ./policy.toml, else the packaged default).")
@click.option("--listen", multiple=True, metavar="HOST:PORT",
              help="Address to answer on (UDP and TCP); repeatable. Overrides [server] listen.")
@click.option("--mode", type=click.Choice(["enforce", "audit"]), help="Overrides the policy's mode.")
@click.option("--upstream", multiple=True, metavar="HOST:PORT",
              help="Upstream resolver; repeatable (failover in order). Overrides [upstream] servers.")
@click.option("--db", type=click.Path(dir_okay=False), help="Lookup log database (overrides [log] database).")
@click.option("--no-log", is_flag=True, help="Do not record lookups.")
@click.option("--firewall/--no-firewall", default=None,
              help="Feed addresses from allowed answers into the firewall sets.")
@click.option("--metrics", "metrics", metavar="HOST:PORT",
              help="Serve Prometheus metrics on http://HOST:PORT/metrics (overrides [metrics] listen).")
@click.option("--dnstap", "dnstap", metavar="ADDR",
              help="Send dnstap to unix:/PATH or tcp:HOST:PORT (overrides [dnstap] address).")
def serve(policy_path: str | None, listen: tuple[str, ...], mode: str | None, upstream: tuple[str, ...],
          db: str | None, no_log: bool, firewall: bool | None, metrics: str | None,
          dnstap: str | None) -> None:
    """Run the DNS server.

    Answers names the policy allows (forwarded upstream, cached), NXDOMAIN for
    everything else (never forwarded). SIGHUP or editing the policy file reloads it.

    Example:

        dnsguard serve --policy policy.toml --listen 127.0.0.1:5353

        dig @127.0.0.1 -p 5353 pypi.org
    """
    from resolver.app import ServeOptions, run

    opts = ServeOptions(
        policy_path=policy_path or str(default_policy_path()),
        listen=_hostports(listen, 53),
        mode=mode,
        upstream=_hostports(upstream, 53),
        db=db,
        log_enabled=False if no_log else None,
        firewall=firewall,
        metrics=_hostports((metrics,), 9153)[0] if metrics else None,
        dnstap=_dnstap_address(dnstap) if dnstap else None,
    )
    try:
        code = run(opts)
    except DnsguardError as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"cannot serve: {exc}") from None
    sys.exit(code)


@main.command()
@click.argument("name", required=False)
@click.option("--policy", "policy_path", type=click.Path(dir_okay=False),
              help="Policy file (default: ./policy.toml, else the packaged default).")
@click.option("--client", metavar="IP", default="127.0.0.1", show_default=True,
              help="Decide as for this client address ([[clients]] policies).")
def check(name: str | None, policy_path: str | None, client: str) -> None:
    """Say whether NAME is allowed, and which rule decided.

    Exit code 0 = allowed, 1 = denied, 2 = bad policy or name. With no NAME,
    only validates the policy file.

    Example:

        dnsguard check pypi.org --policy policy.toml
    """
    from resolver.dns.chain import Resolver

    path = policy_path or str(default_policy_path())
    try:
        config = load_config(path)
    except DnsguardError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    if name is None:
        click.echo(f"{path}: ok ({config.matcher.rule_count} rules, mode {config.mode})")
        return
    try:
        wire_name = text_to_wire(name)
    except ValueError as exc:
        click.echo(f"error: {name!r} is not a valid name: {exc}", err=True)
        sys.exit(2)
    view = Resolver.view_for(config, client)
    d = view.matcher.decide(wire_name)
    who = f" (client {view.label})" if view.label else ""
    if d.allowed:
        click.echo(f"allowed{who}: {name} by rule {d.rule!r}")
        sys.exit(0)
    why = f"by deny rule {d.rule!r}" if d.rule else "by default (no allow rule matches)"
    click.echo(f"denied{who}: {name} {why}" + (" [audit mode: would be answered]" if view.audit else ""))
    sys.exit(1)


def _register() -> None:
    # Command groups live beside the library code they wrap; the CLI only collects them.
    from resolver.cli.doctor import doctor
    from resolver.cli.firewall import firewall
    from resolver.cli.init import init
    from resolver.cli.learn import learn, policy
    from resolver.cli.report import report

    main.add_command(report)
    main.add_command(learn)
    main.add_command(policy)
    main.add_command(firewall)
    main.add_command(init)
    main.add_command(doctor)


_register()

if __name__ == "__main__":  # pragma: no cover
    main()
