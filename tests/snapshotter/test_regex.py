"""The ``~=`` matcher (:mod:`lamina.frontends.containerd.regex`): the same answers as
Python's ``re`` where both engines agree on the syntax, Go's where they differ, and
time linear in the input for patterns that make ``re`` backtrack (issue 23, D5)."""

from __future__ import annotations

import re
import time

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from lamina.frontends.containerd import regex

ALPHABET = "ab1-_ "
"""Texts of the property test: no newline (Go's ``$`` is Python's ``\\Z``)."""

ATOMS = ["a", "b", "1", "-", ".", "[ab]", "[^a]", "[a-b1]", "[^-a]", r"\d", r"\w", r"\s",
         r"\D", r"\W", r"\S", r"\.", r"\-", "[-a]", "[a-]", r"[\d_]", "^", "$"]
QUANTIFIERS = ["", "", "", "*", "+", "?", "{2}", "{0,2}", "{1,}", "{2,3}", "*?", "+?", "??",
               "{1,2}?"]


def patterns() -> st.SearchStrategy[str]:
    atom = st.sampled_from(ATOMS)

    def extend(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
        group = st.tuples(st.sampled_from(["(", "(?:"]), inner).map(lambda t: f"{t[0]}{t[1]})")
        quantified = st.tuples(st.one_of(atom, group), st.sampled_from(QUANTIFIERS)).map(
            lambda t: t[0] + t[1] if t[0] not in "^$" else t[0])
        seq = st.lists(quantified, min_size=0, max_size=4).map("".join)
        return st.lists(seq, min_size=1, max_size=3).map("|".join)

    return st.recursive(atom, extend, max_leaves=12)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(patterns(), st.lists(st.text(ALPHABET, max_size=12), min_size=1, max_size=8))
def test_the_same_answers_as_python_re(pattern: str, texts: list[str]) -> None:
    try:
        want = re.compile(pattern, re.ASCII)
    except re.error:
        assume(False)
        return
    got = regex.compile(pattern)
    for text in texts:
        assert got.search(text) == (want.search(text) is not None), (pattern, text)


@pytest.mark.parametrize(("pattern", "text", "found"), [
    ("abc$", "abc\n", False),     # Go's $ is the end of the text, not before a last \n
    (r"\s", "\v", False),         # Go's \s has no \v
    ("[^a]", "\n", True),         # a negated class takes a newline, . does not
    ("a.c", "a\nc", False),
    ("^^a$$", "a", True),         # every anchor holds at its place
    ("a^b", "ab", False),
    ("(^|x)a", "xa", True),
    ("a{", "a{", True),           # a { that is no repetition is itself
    ("a{,2}", "a{,2}", True),
    (r"\x41\x{1F600}", "A\U0001F600", True),
    (r"[[:alpha:]]+\z", "1ab", True),
    (r"[[:^digit:]]", "12", False),
    (r"\_\/", "_/", True),
    ("(?P<n>a)(?:b)", "ab", True),
    ("x*", "", True),
    ("", "anything", True),
    ("é+", "café", True),         # characters, not bytes
])
def test_go_semantics(pattern: str, text: str, found: bool) -> None:
    assert regex.compile(pattern).search(text) is found


@pytest.mark.parametrize("pattern", ["(", "a)", "[a", "a**", "a+*", "a{2}{3}", "*a", "{2}",
                                     "a{1001}", "a{3,2}", "[b-a]", r"\8", r"\y", "(?=a)",
                                     "(?<!a)", "x\\"])
def test_what_go_refuses(pattern: str) -> None:
    with pytest.raises(regex.RegexError):
        regex.compile(pattern)


@pytest.mark.parametrize("pattern", ["(?i)a", "(?s:.)", r"\bword", r"\pL", r"\Qa.b\E", r"\101"])
def test_what_lamina_does_not_take(pattern: str) -> None:
    with pytest.raises(regex.Unsupported):
        regex.compile(pattern)


def test_size_bounds() -> None:
    assert regex.compile("a" * regex.MAX_POSITIONS).size == regex.MAX_POSITIONS
    with pytest.raises(regex.TooLarge):
        regex.compile("a" * (regex.MAX_POSITIONS + 1))
    with pytest.raises(regex.TooLarge):
        regex.compile("(a{100}){6}")
    with pytest.raises(regex.TooLarge):
        regex.compile("a" * (regex.MAX_PATTERN + 1))
    with pytest.raises(regex.TooLarge):
        regex.compile("(" * 150 + ")" * 150)


@pytest.mark.parametrize("pattern", ["^(a+)+$", "(a|aa)+$", "(a*)*b", "(a|a)*c",
                                     "(x+x+)+y", "a*a*a*a*a*a*a*a*a*b",
                                     "[ab]*a[ab]{400}"])
def test_linear_time_where_re_backtracks(pattern: str) -> None:
    """A megabyte of input that makes a backtracking engine take forever (or 8.8 s for
    29 characters: the issue's), searched in about a second at most."""
    compiled = regex.compile(pattern)
    text = "a" * 28 + "!"
    t0 = time.monotonic()
    assert not compiled.search(text)
    assert time.monotonic() - t0 < 0.05
    text = ("ab" * 50_000 + "!") if "[ab]" in pattern else ("a" * 100_000 + "!")
    t0 = time.monotonic()
    compiled.search(text)
    took = time.monotonic() - t0
    print(f"\n{pattern}: {len(text)} characters in {took * 1000:.0f} ms")
    assert took < 3.0, took
