from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from resolver.core.names import normalise, text_to_wire, wire_to_text


@pytest.mark.parametrize(("text", "wire"), [
    ("PyPI.org.", b"\x04pypi\x03org\x00"),
    ("pypi.org", b"\x04pypi\x03org\x00"),
    (".", b"\x00"),
    ("a\\.b.example", b"\x03a.b\x07example\x00"),
    ("\\065.example", b"\x01a\x07example\x00"),
    ("bücher.example", b"\x0dxn--bcher-kva\x07example\x00"),
    ("faß.de", b"\x0axn--fa-hia\x02de\x00"),  # IDNA 2008: not "fass.de" as IDNA 2003 would say
])
def test_text_to_wire(text, wire):
    assert text_to_wire(text) == wire


def test_wire_to_text_escapes_dots_and_odd_bytes():
    assert wire_to_text(b"\x03a.b\x07example\x00") == "a\\.b.example"
    assert wire_to_text(b"\x02\x00\xff\x00") == "\\000\\255"
    assert wire_to_text(b"\x00") == "."


@pytest.mark.parametrize("bad", ["example.com..", "a..b", ".a", "a.\\", "x\\999.com"])
def test_malformed_names(bad):
    with pytest.raises(ValueError):
        text_to_wire(bad)


def test_name_length_limits():
    with pytest.raises(ValueError):
        text_to_wire("a" * 64 + ".example")
    with pytest.raises(ValueError):
        text_to_wire(".".join(["a" * 63] * 4))  # 256 octets in wire form
    assert len(text_to_wire(".".join(["a" * 63] * 3 + ["a" * 61]))) == 255


@given(st.lists(st.binary(min_size=1, max_size=63), min_size=1, max_size=3))
def test_round_trip(labels):
    wire = b"".join(bytes([len(x)]) + x for x in labels) + b"\x00"
    assert text_to_wire(wire_to_text(wire)) == wire.lower()


def test_normalise():
    assert normalise("WWW.Example.COM.") == "www.example.com"
