"""Exfiltration-shaped lookups: names that carry data instead of naming a host.

A DNS query reaches the authoritative server of its domain whatever the answer is,
so a client can leak data by *asking* for ``<chunk-of-data>.attacker.example`` --
NXDOMAIN and denied-in-audit lookups leak just as well as answered ones. The
tell-tale shapes are:

* **labels that look encoded**: very long labels, hex, base32 and base64-like
  strings, or just a high-entropy mix of letters and digits with few vowels;
* **many distinct names under one domain**: a tunnel mints a new name per chunk,
  so one registrable domain grows hundreds of names, often within a minute.

Only the labels *below the registrable domain* are judged (``abc.evil.example`` ->
``abc``): that is the part a domain's owner lets clients vary at will, while the
registrable domain itself (``d1a2b3c4.cloudfront.net``, ``xn--bcher-kva.de``) was
picked by someone and is the same on every lookup. The public-suffix list (with
its private section, read offline from the ``publicsuffixlist`` package) says where
the registrable domain starts.

Everything here is pure: plain values in, plain values out, no I/O. ``detect`` is
the entry point for ``dnsguard learn`` and ``dnsguard report``; the thresholds are
one frozen dataclass so callers can tune them.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

from publicsuffixlist import PublicSuffixList

from resolver.core.names import label_to_text, text_to_wire, wire_labels

__all__ = [
    "DEFAULT_THRESHOLDS", "Finding", "Observation", "Thresholds", "detect", "flagged_names",
    "group_key", "is_public_suffix", "label_reasons", "name_reasons", "registrable_domain",
    "spans_public_suffix", "split_labels", "wildcard_ok",
]


@dataclass(frozen=True, slots=True)
class Thresholds:
    """Knobs of the detector; the defaults aim at few false positives on real hostnames."""

    max_label: int = 40          # a label longer than this is flagged outright
    encoded_min_len: int = 16    # hex/base32/base64 checks look at runs at least this long
    entropy_min_len: int = 20    # the entropy check looks at labels at least this long
    entropy_bits: float = 4.0    # ... with at least this many bits per character
    entropy_margin: float = 0.3  # a run this close to random base32's entropy counts as random
    max_vowel_ratio: float = 0.35  # random letters have ~0.19 vowels per letter; words ~0.4
    burst_window_s: float = 60.0  # "a short time"
    burst_names: int = 50        # more new distinct names than this under one domain in the window
    max_names: int = 300         # more distinct names than this under one domain in all
    similar_min: int = 3         # this many encoded-looking names taint their domain's other long labels


DEFAULT_THRESHOLDS = Thresholds()


@dataclass(frozen=True, slots=True)
class Observation:
    """One distinct name seen in the log (any verdict, any rcode)."""

    name: str            # presentation text, lower case, as the lookup log stores it
    first_seen: float    # epoch seconds
    last_seen: float
    count: int = 1       # lookups of this name


@dataclass(frozen=True, slots=True)
class Finding:
    """One reason to distrust a group of names under one domain."""

    domain: str                 # registrable domain (or parent) the names sit under
    kind: str                   # long-label | hex | base32 | base64 | entropy | charset | similar
                                #   | burst | volume
    reason: str                 # one line for people
    names: tuple[str, ...]      # every name implicated, sorted
    lookups: int
    first_seen: float
    last_seen: float

    def as_dict(self) -> dict:
        return {"domain": self.domain, "kind": self.kind, "reason": self.reason,
                "names": list(self.names), "name_count": len(self.names), "lookups": self.lookups,
                "first_seen": self.first_seen, "last_seen": self.last_seen}


# ------------------------------------------------------------------ public suffixes
@lru_cache(maxsize=1)
def _psl() -> PublicSuffixList:

    # Bundled copy of the list, ICANN *and* private sections (github.io, s3.amazonaws.com ...);
    # unknown TLDs (.test, .lan, .internal) count as public suffixes of one label.
    return PublicSuffixList(only_icann=False, accept_unknown=True)


def split_labels(name: str) -> list[str]:
    """Labels of a presentation name, honouring escapes (``a\\.b.example`` has 2 labels)."""
    if "\\" not in name and name.isascii():
        # The common case, ~20x cheaper than the round trip through wire format. The lower
        # case is the canonical form the log stores.
        return [p for p in name.lower().rstrip(".").split(".") if p]
    try:
        return [label_to_text(lb) for lb in wire_labels(text_to_wire(name))]
    except (ValueError, IndexError):
        return [p for p in name.lower().rstrip(".").split(".") if p]


@lru_cache(maxsize=65536)
def registrable_domain(name: str) -> str | None:
    """``www.example.co.uk`` -> ``example.co.uk``; None when ``name`` is itself a public suffix."""
    labels = split_labels(name)
    if not labels:
        return None
    if any("\\" in lb for lb in labels):
        # Escaped bytes never appear in the list: find the public suffix among the plain
        # labels on the right, and take one label more, whatever it holds.
        plain: list[str] = []
        for lb in reversed(labels):
            if "\\" in lb:
                break
            plain.append(lb)
        if not plain:
            return None
        suffix = _psl().publicsuffix(".".join(reversed(plain))) or plain[0]
        n = len(suffix.split("."))
        return ".".join(labels[-(n + 1):]) if n < len(labels) else None
    return _psl().privatesuffix(".".join(labels))


def is_public_suffix(name: str) -> bool:
    """True for ``com``, ``co.uk``, ``github.io``, ``s3.amazonaws.com`` (and unknown TLDs)."""
    return registrable_domain(name) is None


@lru_cache(maxsize=1)
def _suffix_parents() -> frozenset[str]:
    """Names that have a public suffix strictly below them (``amazonaws.com``: s3.amazonaws.com)."""
    import publicsuffixlist  # the module, for its bundled list's path and IDN encoder

    out: set[str] = set()
    with open(publicsuffixlist.PSLFILE, encoding="utf-8") as fh:
        for line in fh:
            rule = line.strip().split(" ")[0].lstrip("!")
            if not rule or rule.startswith("//"):
                continue
            if rule.startswith("*."):
                rule = rule[2:]
            try:
                labels = publicsuffixlist.encode_idn(rule).lower().split(".")
            except (UnicodeError, ValueError):
                continue
            out.update(".".join(labels[i:]) for i in range(1, len(labels)))
    return frozenset(out)


def spans_public_suffix(name: str) -> bool:
    """True when some public suffix sits strictly below ``name`` (``amazonaws.com``, ``windows.net``).

    A wildcard there would reach into other people's registrable domains:
    ``*.amazonaws.com`` covers every ``bucket.s3.amazonaws.com``.
    """
    return ".".join(split_labels(name)) in _suffix_parents()


def wildcard_ok(parent: str) -> bool:
    """May ``*.parent`` be proposed? Only at or below a registrable domain, and never over
    a public suffix (not ``*.com``, ``*.co.uk``, ``*.github.io``, ``*.s3.amazonaws.com``,
    ``*.amazonaws.com``)."""
    return not is_public_suffix(parent) and not spans_public_suffix(parent)


def group_key(name: str) -> str:
    """Where a name's "distinct subdomains" are counted: its registrable domain, else its parent."""
    reg = registrable_domain(name)
    if reg is not None:
        return reg
    labels = split_labels(name)
    return ".".join(labels[1:]) if len(labels) > 1 else name


def _below_registrable(name: str) -> list[str]:
    labels = split_labels(name)
    reg = registrable_domain(name)
    if reg is None:
        return []
    return labels[:len(labels) - len(split_labels(reg))]


# ------------------------------------------------------------------------ labels
_HEX = frozenset("0123456789abcdef")
_B32 = frozenset("abcdefghijklmnopqrstuvwxyz234567")
_ALNUM_ = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_")
_HOSTCHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_")
_VOWELS = frozenset("aeiouy")


def _entropy(text: str) -> float:
    n = len(text)
    return -sum(c / n * math.log2(c / n) for c in Counter(text).values()) if n else 0.0


def _random_entropy(n: int, alphabet: int = 32) -> float:
    """Expected per-character entropy of ``n`` random symbols (Miller-Madow corrected)."""
    return math.log2(alphabet) - (alphabet - 1) / (2 * n * math.log(2))


def _switches(text: str) -> int:
    """How often the text flips between letters and digits (``a1b2`` -> 3)."""
    return sum(1 for a, b in zip(text, text[1:], strict=False)
               if a.isalnum() and b.isalnum() and a.isdigit() != b.isdigit())


def _vowel_ratio(text: str) -> float:
    letters = [c for c in text if c.isalpha()]
    return sum(c in _VOWELS for c in letters) / len(letters) if letters else 0.0


def _is_idn(label: str) -> bool:
    if not label.startswith("xn--"):
        return False
    try:
        label.encode("ascii").decode("idna")
    except UnicodeError:
        return False
    return True


def label_reasons(label: str, th: Thresholds = DEFAULT_THRESHOLDS) -> list[tuple[str, str]]:
    """(kind, detail) for each way one label looks like data; [] for a normal label."""
    text = label.lower()
    out: list[tuple[str, str]] = []
    if len(text) > th.max_label:
        out.append(("long-label", f"{len(text)}-character label"))
    if "\\" in text or not set(text) <= _HOSTCHARS:
        out.append(("charset", "bytes no hostname uses"))
        return out
    if _is_idn(text):
        return out  # a valid internationalised label: judged by its length only
    digits = sum(c.isdigit() for c in text)
    segments = text.split("-")
    squeezed = text.replace("-", "")
    for seg in segments:
        if len(seg) < th.encoded_min_len or not set(seg) <= _ALNUM_:
            continue
        seg_digits = sum(c.isdigit() for c in seg)
        letters = len(seg) - seg_digits - seg.count("_")
        kind = "base32" if set(seg) <= _B32 else "base64"
        if set(seg) <= _HEX and seg_digits and letters:
            out.append(("hex", f"{len(seg)} hex digits"))
            return out
        switches = _switches(seg)
        if seg_digits >= 2 and letters >= 4 and (
                switches >= 4 or (switches >= 3 and _vowel_ratio(seg) <= th.max_vowel_ratio)):
            out.append((kind, f"{len(seg)}-character {kind}-like run"))
            return out
        if (len(seg) >= th.entropy_min_len and seg_digits >= 2 and switches >= 3
                and _entropy(seg) >= _random_entropy(len(seg)) - th.entropy_margin):
            out.append((kind, f"{len(seg)}-character {kind}-like run "
                              f"({_entropy(seg):.1f} bits/char)"))
            return out
    # Dashes do not hide a UUID-like or dash-chunked hex string.
    if (len(squeezed) >= 2 * th.encoded_min_len and set(squeezed) <= _HEX
            and any(c.isdigit() for c in squeezed) and any(c.isalpha() for c in squeezed)):
        out.append(("hex", f"{len(squeezed)} hex digits"))
        return out
    if (len(text) >= th.entropy_min_len and digits >= 2 and _switches(text) >= 3
            and _vowel_ratio(text) <= th.max_vowel_ratio and _entropy(text) >= th.entropy_bits):
        out.append(("entropy", f"{_entropy(text):.1f} bits/char over {len(text)} characters"))
    return out


def name_reasons(name: str, th: Thresholds = DEFAULT_THRESHOLDS) -> list[tuple[str, str]]:
    """(kind, detail) for the labels of ``name`` below its registrable domain.

    Bytes no hostname uses are flagged wherever they are, the registrable domain included.
    """
    out = []
    below = _below_registrable(name)
    for label in below:
        for kind, detail in label_reasons(label, th):
            out.append((kind, f"{detail} ({label[:24]}{'...' if len(label) > 24 else ''})"))
    if not out:
        rest = split_labels(name)[len(below):]
        odd = [lb for lb in rest if "\\" in lb or not set(lb.lower()) <= _HOSTCHARS]
        if odd:
            out.append(("charset", f"bytes no hostname uses ({odd[0][:24]})"))
    return out


# ------------------------------------------------------------------------ detect
_KIND_TEXT = {
    "long-label": "very long labels",
    "hex": "hex-encoded-looking labels",
    "base32": "base32-looking labels",
    "base64": "base64-looking labels",
    "entropy": "high-entropy labels",
    "charset": "labels with bytes no hostname uses",
}


def _as_observation(item: Observation | tuple) -> Observation:
    if isinstance(item, Observation):
        return item
    name, first, last, *rest = item
    return Observation(name, float(first), float(last), int(rest[0]) if rest else 1)


def _max_in_window(times: list[float], window: float) -> tuple[int, float]:
    """Most timestamps inside any ``window`` seconds, and where that window starts."""
    best, start, j = 0, times[0] if times else 0.0, 0
    for i, t in enumerate(times):
        while t - times[j] > window:
            j += 1
        if i - j + 1 > best:
            best, start = i - j + 1, times[j]
    return best, start


def detect(observations: Iterable[Observation | tuple],
           thresholds: Thresholds = DEFAULT_THRESHOLDS) -> list[Finding]:
    """Find exfiltration-shaped names.

    ``observations`` are one per distinct name: :class:`Observation` or a tuple
    ``(name, first_seen, last_seen[, count])``. Feed it *every* name a client asked
    for, whatever the verdict and rcode: a denied or NXDOMAIN lookup leaks as well.
    Returns findings ordered by domain then kind; the same name may appear in several
    (say, ``base32`` and ``burst``). Use :func:`flagged_names` for name -> reasons.
    """
    th = thresholds
    by_name: dict[str, Observation] = {}
    for item in observations:
        ob = _as_observation(item)
        old = by_name.get(ob.name)
        if old is not None:
            ob = Observation(ob.name, min(old.first_seen, ob.first_seen), max(old.last_seen, ob.last_seen),
                             old.count + ob.count)
        by_name[ob.name] = ob

    label_hits: dict[tuple[str, str], list[tuple[Observation, str]]] = defaultdict(list)
    groups: dict[str, list[Observation]] = defaultdict(list)
    for ob in by_name.values():
        key = group_key(ob.name)
        groups[key].append(ob)
        for kind, detail in name_reasons(ob.name, th):
            label_hits[(key, kind)].append((ob, detail))

    findings: list[Finding] = []
    shaped: dict[str, set[str]] = defaultdict(set)
    for (domain, kind), hits in label_hits.items():
        obs = [ob for ob, _ in hits]
        shaped[domain].update(ob.name for ob in obs)
        example = hits[0][1]
        findings.append(_finding(domain, kind, f"{len(obs)} name(s) under {domain} with "
                                 f"{_KIND_TEXT[kind]}, e.g. {example}", obs))
    # A tunnel's chunks are all alike, but a random chunk now and then happens to read
    # like a word: once a domain has several encoded-looking names, its other names
    # with long labels go with them.
    for domain, names in shaped.items():
        if len(names) < th.similar_min:
            continue
        alike = [ob for ob in groups[domain] if ob.name not in names and any(
            len(label) >= th.encoded_min_len and not _is_idn(label)
            for label in _below_registrable(ob.name))]
        if alike:
            findings.append(_finding(domain, "similar", f"{len(alike)} more name(s) under {domain} "
                                     f"with long labels like its {len(names)} encoded-looking ones", alike))
    for domain, obs in groups.items():
        if len(obs) > th.burst_names:
            times = sorted(ob.first_seen for ob in obs)
            most, _start = _max_in_window(times, th.burst_window_s)
            if most > th.burst_names:
                findings.append(_finding(domain, "burst", f"{most} new distinct names under {domain} "
                                         f"within {th.burst_window_s:g}s ({len(obs)} in all)", obs))
        if len(obs) > th.max_names:
            findings.append(_finding(domain, "volume", f"{len(obs)} distinct names under {domain} "
                                     f"(more than {th.max_names})", obs))
    findings.sort(key=lambda f: (f.domain, f.kind))
    return findings


def _finding(domain: str, kind: str, reason: str, obs: list[Observation]) -> Finding:
    return Finding(domain, kind, reason, tuple(sorted(ob.name for ob in obs)), sum(ob.count for ob in obs),
                   min(ob.first_seen for ob in obs), max(ob.last_seen for ob in obs))


def flagged_names(findings: Iterable[Finding]) -> dict[str, list[Finding]]:
    """name -> the findings that implicate it."""
    out: dict[str, list[Finding]] = defaultdict(list)
    for f in findings:
        for name in f.names:
            out[name].append(f)
    return dict(out)

