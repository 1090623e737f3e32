"""containerd's filter syntax (its ``filters`` package), for ``List`` of snapshots.

A filter is a comma-separated list of *selectors*, all of which must match (AND);
``List`` takes several filters, any of which may match (OR); an empty filter, or none,
matches everything.  The grammar, as containerd 1.6 parses it::

    selectors := selector ("," selector)*
    selector  := fieldpath (operator value)?
    fieldpath := field ("." field)*
    field     := quoted | [A-Za-z0-9_]+
    operator  := "==" | "!=" | "~="
    value     := quoted | [^\\s,]+
    quoted    := a Go string literal in "…", or for ~= also in /…/ or |…|

A selector without operator tests that the field is present.  ``!=`` matches an absent
field too (its value is "").  ``~=`` is a regular-expression search; one that does not
compile matches nothing, as containerd's does.  Whitespace is skipped before a token but
not after a value, and ``/`` and ``|`` always open a quoted literal, so a value with
either (a snapshot key that is a path) must be quoted: ``name=="/a/b"``.  The same
quirks as containerd's scanner, so a filter means here what it means there.

``~=`` searches with :mod:`~lamina.frontends.containerd.regex` (RE2's syntax, in time
linear in the value searched, as Go's ``regexp``), not Python's backtracking ``re``.
Bounds, each ``InvalidArgument`` (containerd has none, but runs every filter in linear
time): the filters of one call together at most :data:`MAX_TEXT` characters, and their
patterns together at most :data:`MAX_STATES` states (``regex.MAX_POSITIONS`` each), so
that no ``List`` costs more than some hundred milliseconds on thousands of snapshots.
A pattern that Go would not compile matches nothing, as in containerd; one that RE2
takes but the regex module does not (flags, ``\\b``, ``\\p``) is ``InvalidArgument``.

Snapshot fields: ``name``, ``parent``, ``kind`` (``active``, ``view``, ``committed``) and
``labels.KEY`` (the rest of the path joined with dots; a quoted field keeps its dots:
``labels."containerd.io/gc.root"``).  A parse error is ``InvalidArgument``.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from lamina import errors
from lamina.frontends.containerd import regex

Fields = Callable[[Sequence[str]], "tuple[str, bool]"]
"""Looks a field path up in the object being matched: its value and whether present."""

_EOF = "EOF"
_QUOTES = "/|\""
_OPERATORS = ("==", "!=", "~=")

MAX_TEXT = 4096
"""Characters the filters of one call may have together."""
MAX_STATES = 2 * regex.MAX_POSITIONS
"""Regex states the ``~=`` patterns of one call may make together."""


class FilterError(errors.InvalidArgument):
    """A filter that does not parse."""


@dataclass(frozen=True)
class Selector:
    """One ``fieldpath op value`` test (``op`` None: the field is present)."""

    fieldpath: tuple[str, ...]
    op: str | None = None
    value: str = ""
    pattern: regex.Regex | None = None

    def matches(self, fields: Fields) -> bool:
        """Whether the object whose fields ``fields`` looks up passes this test."""
        value, present = fields(self.fieldpath)
        if self.op is None:
            return present
        if self.op == "==":
            return present and value == self.value
        if self.op == "!=":
            return value != self.value
        return self.pattern is not None and self.pattern.search(value)


@dataclass(frozen=True)
class Filter:
    """Filters of which any may match, each selectors that all must (no filter: all)."""

    alternatives: tuple[tuple[Selector, ...], ...]

    def matches(self, fields: Fields) -> bool:
        """Whether the object whose fields ``fields`` looks up passes the filter."""
        if not self.alternatives:
            return True
        return any(all(s.matches(fields) for s in alt) for alt in self.alternatives)


def parse_all(filters: Sequence[str]) -> Filter:
    """The filter that matches what any of ``filters`` matches (none given: everything)."""
    size = sum(len(text) for text in filters)
    if size > MAX_TEXT:
        raise FilterError(f"filters of {size} characters (at most {MAX_TEXT} together)")
    alternatives = []
    states = [MAX_STATES]  # what the patterns may still make, shared by all filters
    for text in filters:
        if text == "":
            return Filter(())  # containerd's special case: matches everything
        alternatives.append(_Parser(text, states).selectors())
    return Filter(tuple(alternatives))


def snapshot_fields(name: str, parent: str, kind: str, labels: Mapping[str, str]) -> Fields:
    """The field lookup of a snapshot, as containerd's snapshot adaptor answers it."""

    def lookup(path: Sequence[str]) -> tuple[str, bool]:
        if not path:
            return "", False
        head = path[0]
        if head == "kind":
            return (kind, True) if kind in ("active", "view", "committed") else ("", False)
        if head == "name":
            return name, True
        if head == "parent":
            return parent, True
        if head == "labels":
            if not labels:
                return "", False
            key = ".".join(path[1:])
            return (labels[key], True) if key in labels else ("", False)
        return "", False

    return lookup


# -- the scanner --------------------------------------------------------------------


def _is_field_char(ch: str) -> bool:
    return ch == "_" or ("A" <= ch <= "Z") or ("a" <= ch <= "z") or ("0" <= ch <= "9")


def _is_value_char(ch: str) -> bool:
    # Go's unicode.IsLetter/IsDigit/IsNumber/IsGraphic/IsPunct, less comma and space.
    if ch == "," or ch.isspace():
        return False
    return unicodedata.category(ch)[0] in "LMNPSZ" and ch != "\u0085"


class _Parser:
    """containerd's scanner and recursive-descent parser, token for token."""

    def __init__(self, text: str, states: list[int]) -> None:
        self.text = text
        self.states = states
        self.pos = 0
        self.value_next = False  # after an operator, a bare word is a value
        self.err = ""

    # Characters, as Go's scanner sees them (surrogates from bad UTF-8 are illegal).
    def _peek_char(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else _EOF

    def _fail(self, pos: int, msg: str) -> FilterError:
        if pos < len(self.text):
            where = f"[{self.text[:pos]} >|{self.text[pos]}|< {self.text[pos + 1:]}]"
        else:
            where = f"[{self.text}]"
        return FilterError(f"filters: parse error: {where}: {msg}")

    def _scan(self) -> tuple[int, str, str]:
        """The next token: (position, kind, text); kinds: EOF, quoted, value, field,
        separator, operator, illegal, or the unexpected character itself."""
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1
        start = self.pos
        if start >= len(self.text):
            return start, _EOF, ""
        ch = self.text[start]
        if ch == "\x00" or "\ud800" <= ch <= "\udfff":
            self.err = self.err or ("unexpected null" if ch == "\x00" else "rune error")
            self.pos += 1
            return start, "illegal", ch
        self.pos += 1
        if ch in _QUOTES:
            ok = self._scan_quoted(ch)
            return start, "quoted" if ok else "illegal", self.text[start:self.pos]
        if ch in ",.":
            self.value_next = False
            return start, "separator", ch
        if ch in "=!~":
            while self._peek_char() in ("=", "!", "~"):
                self.pos += 1
            self.value_next = True
            return start, "operator", self.text[start:self.pos]
        if self.value_next:
            while self._peek_char() != _EOF and _is_value_char(self._peek_char()):
                self.pos += 1
            self.value_next = False
            return start, "value", self.text[start:self.pos]
        if _is_field_char(ch):
            while self._peek_char() != _EOF and _is_field_char(self._peek_char()):
                self.pos += 1
            return start, "field", self.text[start:self.pos]
        return start, ch, ""

    def _scan_quoted(self, quote: str) -> bool:
        legal = True
        while True:
            ch = self._peek_char()
            if ch == _EOF or ch == "\n":
                self.err = self.err or "quoted literal not terminated"
                return False
            self.pos += 1
            if ch == quote:
                return legal
            if ch == "\\":
                esc = self._peek_char()
                if esc == _EOF:
                    continue
                self.pos += 1
                digits = {"x": 2, "u": 4, "U": 8}.get(esc)
                if esc in "01234567":
                    legal &= self._scan_digits(8, 2)
                elif digits is not None:
                    legal &= self._scan_digits(16, digits)
                elif esc not in "abfnrtv\\" and esc != quote:
                    self.err = self.err or "illegal escape sequence"
                    legal = False

    def _scan_digits(self, base: int, n: int) -> bool:
        while n > 0 and self._peek_char() != _EOF and _digit(self._peek_char()) < base:
            self.pos += 1
            n -= 1
        if n > 0:
            self.err = self.err or "illegal numeric escape sequence"
            return False
        return True

    # The grammar.
    def selectors(self) -> tuple[Selector, ...]:
        out = [self._selector()]
        while True:
            ch = self._peek_char()
            if ch == _EOF:
                return tuple(out)
            if ch != ",":
                raise self._fail(self.pos, f"unexpected input: {ch}")
            self._scan()
            out.append(self._selector())

    def _selector(self) -> Selector:
        path = self._fieldpath()
        if self._peek_char() in (",", _EOF):
            return Selector(path)
        pos, kind, text = self._scan()
        if kind == "illegal":
            raise self._fail(pos, self.err)
        if kind != "operator":
            raise self._fail(pos, 'expected an operator ("=="|"!="|"~=")')
        if text not in _OPERATORS:
            raise self._fail(pos, f"unsupported operator {_go_quote(text)}")
        value = self._value(allow_alt_quotes=text == "~=")
        pattern = self._pattern(value) if text == "~=" else None
        return Selector(path, text, value, pattern)

    def _pattern(self, value: str) -> regex.Regex | None:
        try:
            pattern = regex.compile(value, min(regex.MAX_POSITIONS, self.states[0]))
        except (regex.Unsupported, regex.TooLarge) as e:
            raise FilterError(f"filters: regular expression {value[:64]!r}: {e}") from None
        except regex.RegexError:
            return None  # containerd logs it and matches nothing
        self.states[0] -= pattern.size
        return pattern

    def _fieldpath(self) -> tuple[str, ...]:
        fields = [self._field()]
        while self._peek_char() == ".":
            self._scan()
            fields.append(self._field())
        return tuple(fields)

    def _field(self) -> str:
        pos, kind, text = self._scan()
        if kind == "field":
            return text
        if kind == "quoted":
            return self._unquote(pos, text, allow_alts=False)
        if kind == "illegal":
            raise self._fail(pos, self.err)
        raise self._fail(pos, "expected field or quoted")

    def _value(self, allow_alt_quotes: bool) -> str:
        pos, kind, text = self._scan()
        if kind in ("value", "field"):
            return text
        if kind == "quoted":
            return self._unquote(pos, text, allow_alts=allow_alt_quotes)
        if kind == "illegal":
            raise self._fail(pos, self.err)
        if kind == _EOF:
            raise FilterError("filters: unexpected EOF")
        raise self._fail(pos, "expected value or quoted")

    def _unquote(self, pos: int, text: str, *, allow_alts: bool) -> str:
        if not allow_alts and text[0] not in "'\"":
            raise self._fail(pos, "invalid quote encountered")
        try:
            return _unquote(text)
        except ValueError:
            raise self._fail(pos, "unquoting failed: quote syntax error") from None


def _digit(ch: str) -> int:
    if "0" <= ch <= "9":
        return ord(ch) - ord("0")
    if "a" <= ch.lower() <= "f":
        return ord(ch.lower()) - ord("a") + 10
    return 16


_SIMPLE_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t",
                   "v": "\v", "\\": "\\"}


def _unquote(text: str) -> str:
    """A quoted literal's value, as Go's strconv.Unquote (``/`` and ``|`` as ``"``)."""
    quote, body = text[0], text[1:-1]
    if len(text) < 2 or text[-1] != quote or "\n" in body:
        raise ValueError(text)
    out = bytearray()
    i = 0
    while i < len(body):
        ch = body[i]
        if ch == quote:
            raise ValueError(text)
        if ch != "\\":
            out += ch.encode("utf-8", "surrogatepass")
            i += 1
            continue
        if i + 1 >= len(body):
            raise ValueError(text)
        esc = body[i + 1]
        i += 2
        if esc in _SIMPLE_ESCAPES:
            out += _SIMPLE_ESCAPES[esc].encode()
        elif esc in "xuU":
            n = {"x": 2, "u": 4, "U": 8}[esc]
            digits = body[i:i + n]
            if len(digits) < n or any(_digit(d) > 15 for d in digits):
                raise ValueError(text)
            value = int(digits, 16)
            i += n
            if esc == "x":
                out.append(value)  # one byte, possibly not UTF-8
            elif value > 0x10FFFF:
                raise ValueError(text)
            else:
                out += chr(value).encode("utf-8", "surrogatepass")
        elif esc in "01234567":
            digits = body[i - 1:i + 2]
            if len(digits) < 3 or any(d not in "01234567" for d in digits):
                raise ValueError(text)
            value = int(digits, 8)
            if value > 255:
                raise ValueError(text)
            out.append(value)
            i += 2
        elif esc in "'\"|/" and esc == quote:
            out += esc.encode()
        else:
            raise ValueError(text)
        if quote == "'" and i < len(body):
            raise ValueError(text)  # a single-quoted literal is one character
    return out.decode("utf-8", "replace")


def _go_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
