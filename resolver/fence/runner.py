"""Plans and the one runner: an apply or remove is a list of Steps computed from the current
state, then carried out by ``execute`` (iptables-restore --noflush per family, ipset).
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from resolver.fence.conntrack import ACCT_SYSCTLS, enable_accounting
from resolver.fence.ipsets import DEFAULT_SET4, DEFAULT_SET6, IpsetError, SetFeeder
from resolver.fence.rules import (
    TOOLS,
    FenceSpec,
    FirewallError,
    IPNetwork,
    Ruleset,
    fence_rules,
    notes,
    parse_save,
    removal_lines,
    render,
)

# ------------------------------------------------------------------ plans and the runner

@dataclass(frozen=True)
class Step:
    """One thing to do: run `argv` (with `input` on stdin), or an ipset action."""

    argv: tuple[str, ...]
    input: str | None = None
    why: str = ""
    sets: tuple[str, ...] = ()  # for ipset steps: set names
    action: str = "run"  # "run" | "ensure-sets" | "destroy-sets" | "accounting"

    def describe(self) -> str:
        if self.action == "ensure-sets":
            return (f"# {self.why}\n" + "\n".join(
                f"ipset create {n} hash:ip family {'inet' if i == 0 else 'inet6'} timeout 300 "
                f"hashsize 1024 maxelem 262144 -exist" for i, n in enumerate(self.sets)))
        if self.action == "accounting":
            return f"# {self.why}\n" + "\n".join(f"sysctl -w {key}=1" for key in ACCT_SYSCTLS)
        if self.action == "destroy-sets":
            return f"# {self.why}\n" + "\n".join(f"ipset destroy {n}" for n in self.sets)
        text = f"# {self.why}\n{shlex.join(self.argv)}"
        if self.input is not None:
            text += " <<'EOF'\n" + self.input + "EOF"
        return text


@dataclass
class Plan:
    steps: list[Step]
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        parts = [s.describe() for s in self.steps] or ["# nothing to do"]
        parts += [f"# note: {n}" for n in self.notes]
        return "\n".join(parts) + "\n"


class Runner:
    """Runs commands (optionally inside `ip netns exec NETNS`) and ipset actions. The only executor."""

    def __init__(self, netns: str | None = None, timeout: float = 30.0) -> None:
        self.netns = netns
        self.timeout = timeout

    def argv(self, argv: Sequence[str]) -> list[str]:
        return (["ip", "netns", "exec", self.netns] if self.netns else []) + list(argv)

    def run(self, argv: Sequence[str], input: str | None = None, check: bool = True
            ) -> subprocess.CompletedProcess[str]:
        full = self.argv(argv)
        if shutil.which(full[0]) is None:
            raise FirewallError(f"{full[0]} not found: install iptables (and run as root)")
        try:
            proc = subprocess.run(full, input=input, capture_output=True, text=True, timeout=self.timeout,
                                  check=False)
        except subprocess.TimeoutExpired:
            raise FirewallError(f"{shlex.join(full)} did not finish in {self.timeout:.0f}s") from None
        if check and proc.returncode != 0:
            where = f" (input:\n{input})" if input else ""
            raise FirewallError(f"{shlex.join(full)} failed ({proc.returncode}): "
                                f"{proc.stderr.strip() or proc.stdout.strip()}{where}")
        return proc

    def save(self, family: int) -> str:
        return self.run([TOOLS[family][1]]).stdout


def execute(plan: Plan, runner: Runner, set_names: tuple[str, str] = (DEFAULT_SET4, DEFAULT_SET6)) -> None:
    """Carry out a plan, step by step; stops at the first failure (FirewallError)."""
    for step in plan.steps:
        if step.action == "run":
            runner.run(step.argv, step.input)
            continue
        if step.action == "accounting":
            # Counters are worth a warning, not a fence that fails to come up (and, from the
            # boot unit, an agent that never starts).
            try:
                enable_accounting(runner.netns)
            except OSError as exc:
                plan.notes.append(f"conntrack accounting could not be turned on ({exc}): connections will "
                                  "be recorded without byte counts")
            continue
        try:
            with SetFeeder(1, 1, *(step.sets or set_names), netns=runner.netns) as feeder:
                if step.action == "ensure-sets":
                    feeder.ensure_sets()
                else:
                    for name in step.sets:
                        feeder.destroy_set(name)
        except IpsetError as exc:
            raise FirewallError(str(exc)) from None
        except OSError as exc:
            raise FirewallError(f"ipset netlink: {exc} (run as root)") from None


def current(runner: Runner) -> dict[int, Ruleset]:
    return {family: parse_save(runner.save(family)) for family in (4, 6)}


def plan_apply(spec: FenceSpec, state: dict[int, Ruleset], clients: Sequence[IPNetwork] = ()) -> Plan:
    """Steps that replace whatever dnsguard rules exist with the ones for `spec`."""
    steps = [Step((), why="the sets the rules match on (kept if they exist)", sets=(spec.set4, spec.set6),
                  action="ensure-sets")]
    restores = []
    for family in (4, 6):
        rs = state[family]
        new = fence_rules(spec, family, docker_user=rs.has_chain("filter", "DOCKER-USER"))
        declared = {(t, line[1:].split()[0]) for t, lines in new.items() for line in lines
                    if line.startswith(":")}
        existing = {(t, c) for t in rs.chains for c in rs.ours(t)}
        removal = removal_lines(rs, keep_declared=declared & existing)
        merged: dict[str, list[str]] = {}
        for table in dict.fromkeys([*removal, *new]):
            # declare only chains that do not exist yet; existing ones were flushed above
            creating = [ln for ln in new.get(table, [])
                        if not (ln.startswith(":") and (table, ln[1:].split()[0]) in existing)]
            merged[table] = removal.get(table, []) + creating
        text = render(merged)
        tool = TOOLS[family][2]
        restores.append(Step((tool, "--noflush"), text,
                             why=f"IPv{family}: remove old dnsguard rules and add new ones, atomically"))
    # Check both families' input before touching either (catches syntax and missing modules).
    for step in restores:
        steps.append(replace(step, argv=(*step.argv, "--test"), why=step.why.split(":")[0] + ": dry run"))
    steps.extend(restores)
    if spec.accounting:
        # After the rules: their conntrack matches load nf_conntrack, whose sysctls these are.
        steps.append(Step((), why="conntrack byte counters and start times for `serve`'s connection "
                          "recorder (its unit cannot write /proc/sys)", action="accounting"))
    return Plan(steps, notes(spec, clients))


def plan_remove(state: dict[int, Ruleset], sets: Sequence[str] = (DEFAULT_SET4, DEFAULT_SET6),
                destroy_sets: bool = True) -> Plan:
    steps = []
    for family in (4, 6):
        text = render(removal_lines(state[family]))
        if text:
            steps.append(Step((TOOLS[family][2], "--noflush"), text,
                              why=f"IPv{family}: delete the jump rules and the DNSGUARD chains"))
    if destroy_sets:
        steps.append(Step((), why="the address sets (kept if another rule still uses them)",
                          sets=tuple(sets), action="destroy-sets"))
    return Plan(steps)


def apply(spec: FenceSpec, runner: Runner | None = None, clients: Sequence[IPNetwork] = ()) -> Plan:
    runner = runner or Runner()
    plan = plan_apply(spec, current(runner), clients)
    execute(plan, runner, (spec.set4, spec.set6))
    return plan


def remove(runner: Runner | None = None, sets: Sequence[str] = (DEFAULT_SET4, DEFAULT_SET6),
           destroy_sets: bool = True) -> Plan:
    runner = runner or Runner()
    plan = plan_remove(current(runner), sets, destroy_sets=False)
    execute(plan, runner)
    if destroy_sets:
        _destroy_sets_best_effort(runner, sets, plan)
    return plan


def _destroy_sets_best_effort(runner: Runner, sets: Sequence[str], plan: Plan) -> None:
    try:
        with SetFeeder(1, 1, *sets, netns=runner.netns) as feeder:
            for name in sets:
                try:
                    feeder.destroy_set(name)
                except IpsetError as exc:
                    plan.notes.append(f"ipset {name} kept: {exc}")
    except OSError as exc:
        plan.notes.append(f"ipsets not removed: {exc}")


