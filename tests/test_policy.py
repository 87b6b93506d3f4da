"""Policy matching: the rules of the README, checked against the compiled index."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resolver.core.names import text_to_wire, wire_labels
from resolver.policy import matcher as matcher_mod
from resolver.policy.matcher import Matcher, RuleError, compile_rule, compile_rules


def decide(m: Matcher, name: str | bytes):
    return m.decide(name if isinstance(name, bytes) else text_to_wire(name))


def test_exact_name_matches_only_itself():
    m = Matcher(allow=["example.com"])
    assert decide(m, "example.com").allowed
    assert decide(m, "example.com").rule == "example.com"
    assert not decide(m, "www.example.com").allowed
    assert not decide(m, "xexample.com").allowed
    assert not decide(m, "com").allowed


def test_wildcard_matches_any_depth_but_not_apex():
    m = Matcher(allow=["*.example.com"])
    for name in ("a.example.com", "a.b.example.com", "x.y.z.example.com"):
        d = decide(m, name)
        assert d.allowed and d.rule == "*.example.com", name
    assert not decide(m, "example.com").allowed
    assert not decide(m, "badexample.com").allowed
    assert not decide(m, "example.com.evil.test").allowed


def test_case_insensitive_for_ascii_only():
    m = Matcher(allow=["kelvin.example"])
    assert decide(m, "KeLvIn.EXAMPLE").allowed
    # The Kelvin sign (U+212A) folds to "k" under str.lower(); in wire form it is
    # different bytes and must not match.
    kelvin = b"\x08\xe2\x84\xaaelvin\x07example\x00"
    assert not m.decide(kelvin.lower()).allowed


def test_trailing_dot_is_ignored():
    m = Matcher(allow=["example.com."])
    assert decide(m, "example.com").allowed
    assert decide(m, "example.com.").allowed


def test_dot_inside_a_label_is_not_a_separator():
    m = Matcher(allow=["*.b.example"])
    assert decide(m, "x.b.example").allowed
    # "a\.b.example" is the two labels "a.b" and "example": not below b.example.
    assert not decide(m, "a\\.b.example").allowed
    m2 = Matcher(allow=["a\\.b.example"])
    assert decide(m2, "a\\.b.example").allowed
    assert not decide(m2, "a.b.example").allowed


def test_idn_names_become_a_labels():
    m = Matcher(allow=["bücher.example", "*.münchen.example"])
    assert decide(m, "xn--bcher-kva.example").allowed
    assert decide(m, "www.xn--mnchen-3ya.example").allowed
    assert decide(m, "bücher.example").allowed


def test_deny_wins_over_allow():
    m = Matcher(allow=["*.example.com", "api.example.com"], deny=["api.example.com", "*.bad.example.com"])
    d = decide(m, "api.example.com")
    assert not d.allowed and d.source == "deny" and d.rule == "api.example.com"
    assert not decide(m, "x.bad.example.com").allowed
    assert decide(m, "bad.example.com").allowed  # the deny wildcard does not cover its apex
    assert decide(m, "www.example.com").allowed


def test_default_is_deny():
    d = decide(Matcher(allow=["a.example"]), "b.example")
    assert not d.allowed and d.rule is None and d.source == "default"


def test_most_specific_allow_rule_is_reported():
    m = Matcher(allow=["*.example.com", "*.api.example.com"])
    assert decide(m, "v1.api.example.com").rule == "*.api.example.com"


@pytest.mark.parametrize("bad", ["*", "*.", "**.x", "*.com", "a*.example.com", "a.*.example.com",
                                 "exa mple.com", "", " example.com", "a..b", "x" * 64 + ".com",
                                 ".".join(["abcdefgh"] * 30), "*x.example.com"])
def test_invalid_entries_are_rejected(bad):
    with pytest.raises(RuleError) as info:
        Matcher(allow=[bad])
    assert info.value.entry == bad


def test_root_query_is_decided_without_error():
    assert not Matcher(allow=["*.example.com"]).decide(b"\x00").allowed


def test_compile_rule_shapes():
    assert compile_rule("*.Example.COM") == (True, text_to_wire("example.com"))
    assert compile_rule("example.com") == (False, text_to_wire("example.com"))


# ---- property: the suffix index agrees with a naive reference matcher ----

LABEL = st.sampled_from(["a", "b", "c", "Ab", "xn--bcher-kva", "a.b", "www", "co", "uk", "k", "K"])
NAME = st.lists(LABEL, min_size=1, max_size=5)


def _naive(allow: list[tuple[bool, tuple]], deny: list[tuple[bool, tuple]], labels: tuple) -> bool:
    def hit(rules):
        for wild, rl in rules:
            if wild and len(labels) > len(rl) and labels[-len(rl):] == rl:
                return True
            if not wild and labels == rl:
                return True
        return False

    return not hit(deny) and hit(allow)


def _escape(label: str) -> str:
    return label.replace(".", "\\.")


@settings(max_examples=300, deadline=None)
@given(allow=st.lists(st.tuples(st.booleans(), st.lists(LABEL, min_size=2, max_size=4)), max_size=6),
       deny=st.lists(st.tuples(st.booleans(), st.lists(LABEL, min_size=2, max_size=4)), max_size=3),
       queries=st.lists(NAME, min_size=1, max_size=10))
def test_index_agrees_with_naive_matcher(allow, deny, queries):
    def rule_text(wild, labels):
        return ("*." if wild else "") + ".".join(_escape(x) for x in labels)

    m = Matcher(allow=[rule_text(w, ls) for w, ls in allow], deny=[rule_text(w, ls) for w, ls in deny])
    lower = [(w, tuple(x.lower().encode() for x in ls)) for w, ls in allow]
    lower_deny = [(w, tuple(x.lower().encode() for x in ls)) for w, ls in deny]
    for q in queries:
        wire_name = text_to_wire(".".join(_escape(x) for x in q))
        labels = tuple(wire_labels(wire_name))
        assert m.decide(wire_name).allowed == _naive(lower, lower_deny, labels), q


def test_million_rules_load_and_match():
    rules = [f"h{i}.example{i % 97}.test" for i in range(500_000)]
    rules += [f"*.w{i}.example.test" for i in range(500_000)]
    m = Matcher(allow=rules)
    assert m.rule_count == 1_000_000
    assert decide(m, "h123456.example72.test").allowed
    assert decide(m, "deep.name.w499999.example.test").allowed
    assert not decide(m, "w499999.example.test").allowed


# ------------------------------------------------------------ bulk compile = one by one
_RULE_CHARS = st.sampled_from(list("abcXYZ019-_.*") + ["\\.", " ", "é", "\n", "a" * 30, "b" * 64])


@given(st.lists(st.lists(_RULE_CHARS, min_size=0, max_size=12).map("".join), min_size=1, max_size=8))
@settings(max_examples=400, deadline=None)
def test_bulk_compile_matches_rule_by_rule(entries):
    try:
        expected = [compile_rule(e) for e in entries]
    except RuleError as exc:
        with pytest.raises(RuleError) as info:
            compile_rules(entries)
        assert str(info.value) == str(exc)
        return
    assert compile_rules(entries) == expected


def test_bulk_compile_plain_names_including_ten_octet_labels():
    entries = ["abcdefghij.example", "*.abcdefghij.test.", "A-B_c.D", "x." * 100 + "y", "*.q.r"]
    assert matcher_mod._compile_plain(entries) == [compile_rule(e) for e in entries]


def test_the_first_spelling_of_a_duplicate_rule_is_reported_across_chunks():
    filler = [f"f{i}.example.com" for i in range(5000)]
    m = Matcher(["Dup.Example.com", *filler, "dup.example.COM", "*.W.example.com", "*.w.example.com"])
    assert m.decide(text_to_wire("dup.example.com")).rule == "Dup.Example.com"
    assert m.decide(text_to_wire("x.w.example.com")).rule == "*.W.example.com"
    assert m.rule_count == 5004
