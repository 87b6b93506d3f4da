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

import re
from collections.abc import Iterable, Sequence

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


_LEN = [bytes((i,)) for i in range(64)]
_CHUNK = 4096
# "*." followed by a single label: a wildcard on a TLD. Starts with a literal, so the search
# jumps from "*" to "*" ("*" only ever starts a name here: checked before it runs).
_WILD_TLD = re.compile(rb"\*\.[^.\n]*\.?(?:\n|\Z)")


def compile_rules(entries: Sequence[str]) -> list[tuple[bool, bytes]]:
    """``compile_rule`` for many entries: the same results (or the same RuleError).

    A policy of plain ASCII names (letters, digits, ``-``, ``_``, an optional leading
    ``*.``) -- every large one in practice -- is checked with a few passes over all of
    them at once and converted in C-level passes, several times faster than rule by rule;
    anything else, or any doubt, goes through ``compile_rule`` entry by entry.
    """
    fast = _compile_plain(entries)
    return fast if fast is not None else [compile_rule(e) for e in entries]


def _compile_plain(entries: Sequence[str]) -> list[tuple[bool, bytes]] | None:
    try:
        blob = "\n".join(entries)
    except TypeError:
        return None
    if not entries or not blob or not blob.isascii():
        return None
    data = blob.lower().encode("ascii")
    if (data.translate(None, b"abcdefghijklmnopqrstuvwxyz0123456789-_.*\n")
            or b".." in data or b"\n\n" in data or b"\n." in data or data[:1] in (b".", b"\n")
            or data.endswith(b"\n")
            or (b"*" in data and data.count(b"*") != data.count(b"\n*.") + data.startswith(b"*."))):
        return None  # some entry needs the careful path (and maybe its error message)
    if b"*" in data and _WILD_TLD.search(data):
        return None  # a wildcard on a TLD (or on nothing): compile_rule says why
    names = data.split(b"\n")
    if len(names) != len(entries) or max(map(len, names)) > 255:  # 255 = "*." + 253
        return None
    wild = [n[0] == 42 for n in names]  # "*", always as "*." (checked above)
    # Drop the "*." prefixes and trailing dots, then turn every label into length + label in
    # C-level passes: name ends become a "\xff" pseudo-label whose length byte 1 is then
    # rewritten to the terminating 0 ("\xff" is neither a label byte here nor a length).
    bare = (b"\n" + data + b"\n").replace(b"\n*.", b"\n").replace(b".\n", b"\n")[1:]
    parts = bare.replace(b"\n", b".\xff.").split(b".")[:-1]
    try:  # _LEN has 64 entries: a label over 63 octets raises IndexError
        stream = b"".join(map(bytes.__add__, map(_LEN.__getitem__, map(len, parts)), parts))
    except IndexError:
        return None
    wires = stream.replace(b"\x01\xff", b"\x00\xff").split(b"\xff")[:-1]
    if len(wires) != len(entries) or max(map(len, wires)) > 255:
        return None
    return list(zip(wild, wires, strict=True))


class Matcher:
    """Compiled allow/deny lists with O(labels) decisions.

    The tables map a key to the rule's text; its Decision is made the first time the rule
    decides something (creating a million frozen Decisions up front cost ~1 s of a load).
    """

    __slots__ = ("_allow_exact", "_allow_wild", "_deny_exact", "_deny_wild", "rule_count", "_made")

    def __init__(self, allow: Iterable[str] = (), deny: Iterable[str] = ()) -> None:
        self._allow_exact: dict[bytes, str] = {}
        self._allow_wild: dict[bytes, str] = {}
        self._deny_exact: dict[bytes, str] = {}
        self._deny_wild: dict[bytes, str] = {}
        self._made: tuple[dict[str, Decision], dict[str, Decision]] = ({}, {})  # (deny, allow)
        count = 0
        for entries, exact, wild in (
            (allow, self._allow_exact, self._allow_wild),
            (deny, self._deny_exact, self._deny_wild),
        ):
            entries = list(entries)
            # In chunks: each bulk step is one C call holding the GIL, and a reload compiles in
            # a thread next to the event loop.
            for i in range(0, len(entries), _CHUNK):
                chunk = entries[i:i + _CHUNK]
                compiled = compile_rules(chunk)
                for kind, table in ((False, exact), (True, wild)):
                    # Keep the first spelling of a duplicated rule, so the reported rule is
                    # stable: built in reverse (the first one written last), never overwriting
                    # what an earlier chunk put in the table.
                    new = {key: entry for (w, key), entry
                           in zip(reversed(compiled), reversed(chunk), strict=True) if w is kind}
                    for key in new.keys() & table.keys():
                        del new[key]
                    table.update(new)
            count += len(entries)
        self.rule_count = count

    def _decision(self, rule: str, allowed: bool) -> Decision:
        made = self._made[allowed]
        d = made.get(rule)
        if d is None:
            d = made[rule] = Decision(allowed, rule, "allow" if allowed else "deny")
        return d

    def decide(self, name: bytes) -> Decision:
        """Decide for a lower-cased wire name. Deny wins; the most specific allow is reported."""
        rule = self._deny_exact.get(name)
        if rule is not None:
            return self._decision(rule, False)
        allowed = self._allow_exact.get(name)
        if name[0] == 0:  # the root has no proper suffix
            return self._decision(allowed, True) if allowed is not None else DEFAULT_DENY
        deny_wild = self._deny_wild
        allow_wild = self._allow_wild
        i = name[0] + 1
        # Walk the proper suffixes, longest first: a wildcard never matches its own apex.
        while name[i]:
            suffix = name[i:]
            rule = deny_wild.get(suffix)
            if rule is not None:
                return self._decision(rule, False)
            if allowed is None:
                allowed = allow_wild.get(suffix)
            i += name[i] + 1
        return self._decision(allowed, True) if allowed is not None else DEFAULT_DENY

    def rules(self) -> Iterable[Decision]:
        """Every compiled rule (for reports and `learn --diff`)."""
        for table, allowed in ((self._allow_exact, True), (self._allow_wild, True),
                               (self._deny_exact, False), (self._deny_wild, False)):
            for rule in table.values():
                yield self._decision(rule, allowed)
