"""The name policy: which names may be resolved, and which rule said so.

Rules are compiled into hash tables keyed by lower-cased wire names, so a
decision costs one dictionary lookup per label of the *query* name and never
depends on how many rules there are (a 1,000,000-rule policy matches as fast
as a 10-rule one). Wildcards are stored by their parent: ``*.example.com`` is
the key ``example.com`` in the wildcard table, and a query matches it when any
*proper* suffix of the query name is that key -- so the apex itself never
matches, and every depth below it does.

Deny wins over allow; anything not matched is denied.
"""

from __future__ import annotations

from collections.abc import Iterable

from resolver.core.model import DEFAULT_DENY, Decision
from resolver.core.names import text_to_wire


class RuleError(ValueError):
    """One policy entry that cannot be compiled; ``entry`` is the text as written."""

    def __init__(self, entry: str, reason: str) -> None:
        self.entry = entry
        self.reason = reason
        super().__init__(f"{entry!r} is not a valid name: {reason}")


def compile_rule(entry: str) -> tuple[bool, bytes]:
    """Parse one rule: returns (is_wildcard, key) or raises RuleError.

    ``*.example.com`` -> (True, wire("example.com")); ``example.com`` -> (False, ...).
    A bare ``*``, a wildcard directly on a top-level domain (``*.com``) and any
    glob other than a whole leading ``*`` label are rejected: they are almost
    always mistakes and would open far more than intended.
    """
    if not isinstance(entry, str):
        raise RuleError(str(entry), "must be a string")
    text = entry.strip()
    if text != entry or not text:
        raise RuleError(entry, "empty or surrounded by spaces")
    wildcard = False
    if text.startswith("*"):
        if not text.startswith("*."):
            raise RuleError(entry, "a wildcard must be a whole leading label, as in '*.example.com'")
        text = text[2:]
        wildcard = True
        if text in ("", "."):
            raise RuleError(entry, "a wildcard needs a parent domain")
    if "*" in text.replace("\\*", ""):
        raise RuleError(entry, "'*' is only allowed as the whole first label")
    try:
        key = text_to_wire(text)
    except ValueError as exc:
        raise RuleError(entry, str(exc)) from None
    if key == b"\x00":
        raise RuleError(entry, "the root cannot be listed")
    if wildcard and key[0] + 2 == len(key):
        raise RuleError(entry, "a wildcard on a top-level domain would match a whole TLD")
    return wildcard, key


class Matcher:
    """Compiled allow/deny lists with O(labels) decisions."""

    __slots__ = ("_allow_exact", "_allow_wild", "_deny_exact", "_deny_wild", "rule_count")

    def __init__(self, allow: Iterable[str] = (), deny: Iterable[str] = ()) -> None:
        self._allow_exact: dict[bytes, Decision] = {}
        self._allow_wild: dict[bytes, Decision] = {}
        self._deny_exact: dict[bytes, Decision] = {}
        self._deny_wild: dict[bytes, Decision] = {}
        count = 0
        for entries, allowed, exact, wild in (
            (allow, True, self._allow_exact, self._allow_wild),
            (deny, False, self._deny_exact, self._deny_wild),
        ):
            source = "allow" if allowed else "deny"
            for entry in entries:
                is_wild, key = compile_rule(entry)
                table = wild if is_wild else exact
                # Keep the first spelling of a duplicated rule, so the reported rule is stable.
                if key not in table:
                    table[key] = Decision(allowed, entry, source)
                count += 1
        self.rule_count = count

    def decide(self, name: bytes) -> Decision:
        """Decide for a lower-cased wire name. Deny wins; the most specific allow is reported."""
        d = self._deny_exact.get(name)
        if d is not None:
            return d
        allowed = self._allow_exact.get(name)
        if name[0] == 0:  # the root has no proper suffix
            return allowed if allowed is not None else DEFAULT_DENY
        deny_wild = self._deny_wild
        allow_wild = self._allow_wild
        i = name[0] + 1
        # Walk the proper suffixes, longest first: a wildcard never matches its own apex.
        while name[i]:
            suffix = name[i:]
            d = deny_wild.get(suffix)
            if d is not None:
                return d
            if allowed is None:
                allowed = allow_wild.get(suffix)
            i += name[i] + 1
        return allowed if allowed is not None else DEFAULT_DENY

    def rules(self) -> Iterable[Decision]:
        """Every compiled rule (for reports and `learn --diff`)."""
        for table in (self._allow_exact, self._allow_wild, self._deny_exact, self._deny_wild):
            yield from table.values()
