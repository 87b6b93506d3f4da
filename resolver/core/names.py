"""Domain names: presentation text <-> lower-cased DNS wire form.

Everything inside dnsguard compares names as *lower-cased wire bytes*
(``b"\\x04pypi\\x03org\\x00"``). ``bytes.lower()`` folds only ASCII A-Z, which is
exactly RFC 4343's rule; ``str.lower()`` on decoded text would also fold
characters such as the Kelvin sign (U+212A) into ``k`` and let a name that is
not ``kelvin.example`` match a rule for it. Length octets (0-63) are never
touched by ``bytes.lower()``, so the whole wire name can be lowered in one call.
Keeping the label boundaries in the bytes also means a dot inside a label
(``a\\.b.example``) can never be confused with a separator.
"""

from __future__ import annotations

import idna

MAX_NAME = 255
MAX_LABEL = 63

# Characters that may appear unescaped in a label of a name written in a policy.
_PLAIN = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")


def _split_presentation(name: str) -> list[bytes]:
    """Split presentation text into raw label bytes, honouring ``\\.`` and ``\\DDD``."""
    labels: list[bytes] = []
    cur = bytearray()
    i, n = 0, len(name)
    while i < n:
        c = name[i]
        if c == "\\":
            digits = name[i + 1:i + 4]
            if len(digits) == 3 and all(d in "0123456789" for d in digits):
                value = int(digits)
                if value > 255:
                    raise ValueError(f"escape \\{digits} is not a byte")
                cur.append(value)
                i += 4
                continue
            if i + 1 >= n:
                raise ValueError("trailing backslash")
            esc = name[i + 1]
            if ord(esc) > 127:
                raise ValueError("escaped non-ASCII character")
            cur.append(ord(esc))
            i += 2
            continue
        if c == ".":
            if not cur:
                raise ValueError("empty label")
            labels.append(bytes(cur))
            cur = bytearray()
            i += 1
            continue
        if ord(c) not in _PLAIN:
            raise ValueError(f"character {c!r} is not allowed in a name")
        cur.append(ord(c))
        i += 1
    if cur:
        labels.append(bytes(cur))
    elif name:  # "example.com.." : the caller stripped one dot, an empty label remains
        raise ValueError("empty label")
    return labels


def _to_a_labels(name: str) -> str:
    """Replace each Unicode label with its IDNA A-label (``bücher`` -> ``xn--bcher-kva``)."""
    if "\\" in name:
        raise ValueError("mixes escapes with non-ASCII characters")
    out = []
    for label in name.split("."):
        if label.isascii():
            out.append(label)
            continue
        try:
            # IDNA 2008 with UTS 46 mapping, as browsers resolve names: "faß" is xn--fa-hia,
            # not "fass" (IDNA 2003, Python's built-in codec, would allow a different domain).
            out.append(idna.encode(label, uts46=True, transitional=False).decode("ascii"))
        except (idna.IDNAError, UnicodeError) as exc:
            raise ValueError(f"not a valid internationalised label: {label!r} ({exc})") from None
    return ".".join(out)


def text_to_wire(name: str) -> bytes:
    """Convert a presentation name to lower-cased wire form.

    A trailing dot is ignored; ``""`` and ``"."`` are the root. Unicode labels
    become their IDNA A-label (``xn--``). Raises ``ValueError`` naming the problem.
    """
    if name in ("", "."):
        return b"\x00"
    if name.endswith(".") and not name.endswith("\\."):
        name = name[:-1]
    if not name.isascii():
        name = _to_a_labels(name)
    labels = _split_presentation(name)
    out = bytearray()
    for label in labels:
        if len(label) > MAX_LABEL:
            raise ValueError(f"label {label[:20]!r}... is longer than {MAX_LABEL} octets")
        out.append(len(label))
        out += label
    out.append(0)
    if len(out) > MAX_NAME:
        raise ValueError(f"name is longer than {MAX_NAME} octets")
    return bytes(out).lower()


def wire_labels(wire: bytes) -> list[bytes]:
    """The labels of an uncompressed wire name, root excluded."""
    labels = []
    i = 0
    while wire[i]:
        n = wire[i]
        labels.append(wire[i + 1:i + 1 + n])
        i += n + 1
    return labels


def label_to_text(label: bytes) -> str:
    # Anything a policy could not contain unescaped is escaped, so the text is
    # safe to print (no control bytes reach a terminal) and parses back exactly.
    out = []
    for b in label:
        if b in _PLAIN:
            out.append(chr(b))
        elif 0x21 <= b <= 0x7E:
            out.append("\\" + chr(b))
        else:
            out.append(f"\\{b:03d}")
    return "".join(out)


def wire_to_text(wire: bytes) -> str:
    """Presentation text of a wire name: no trailing dot, root is ``"."``.

    Dots and other special bytes inside a label are escaped, so the text
    round-trips through ``text_to_wire`` to the same (lower-cased) labels.
    """
    labels = wire_labels(wire)
    if not labels:
        return "."
    return ".".join(label_to_text(label) for label in labels)


def normalise(name: str) -> str:
    """Canonical text of a name (lower case, A-labels, no trailing dot)."""
    return wire_to_text(text_to_wire(name))
