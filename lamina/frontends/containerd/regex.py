"""Regular-expression search in time linear in the input, for containerd's ``~=`` filters.

containerd matches ``~=`` with Go's ``regexp`` (RE2): ``MatchString``, an unanchored
search whose cost is the pattern's size times the input's length, whatever both are.
Python's ``re`` backtracks: ``^(a+)+$`` against 28 ``a`` and a ``!`` took 8.8 s, all of
it holding the GIL, so that one ``List`` stalled every other call (issue 23, D5).  This
module takes the subset of RE2's syntax that filters use and searches without
backtracking.

Syntax (Go's, without flags): literals; ``.`` (anything but a newline); classes
``[...]`` with ranges, negation (``[^...]``, which matches a newline), escapes and
``[:alpha:]``-style ASCII classes; the escapes ``\\d \\w \\s \\D \\W \\S`` (ASCII, as
Go's), ``\\t \\n \\r \\f \\v \\a``, ``\\xHH``, ``\\x{H…}`` and any escaped punctuation;
``^`` and ``\\A`` (beginning of text), ``$`` and ``\\z`` (end of text); groups ``( )``,
``(?: )``, ``(?P<name> )``; alternation ``|``; the quantifiers ``* + ? {n} {n,} {n,m}``
and their lazy forms (the same matches, for a yes-or-no search).  Flags (``(?i)``),
``\\b``, ``\\pL``, ``\\Q…\\E`` and octal escapes are refused as :class:`Unsupported`;
what Go would not compile either is a :class:`RegexError`.

How: the pattern becomes a Glushkov automaton (one state per character-matching
position of the pattern, counted repetitions spelled out, no empty moves), and the
search runs all its states at once as the bits of one integer: for each input
character, the states that follow the active ones (OR-ed from tables of 8 states at a
time) AND-ed with those whose class holds the character.  That is
``len(pattern) / 8`` table look-ups a character at worst; a cache of transitions
already taken makes the usual case one dictionary look-up.  ``^`` and ``$`` are states
that match a sentinel before and after the text (as many sentinels as the pattern has
anchors, since ``^^a`` matches ``a``; in an empty text, sentinels of both kinds, since
``$^`` matches it).  A pattern of more than :data:`MAX_POSITIONS` states, or longer
than :data:`MAX_PATTERN`, is :class:`TooLarge`, as RE2 refuses a program over its
memory budget.
"""

from __future__ import annotations

import bisect
import functools
from collections.abc import Callable
from dataclasses import dataclass

MAX_PATTERN = 1024
"""Characters a pattern may have."""
MAX_POSITIONS = 500
"""States (character positions, counted repetitions spelled out) a pattern may make."""
MAX_REPEAT = 1000
"""Go's bound on a repetition count (``{n,m}``)."""
MAX_DEPTH = 100
"""Nesting of groups and repetitions (the parser and builder recurse)."""
MAX_CACHE = 1 << 16
"""Transitions a compiled pattern remembers (then it forgets them all and goes on)."""

_MAX_RUNE = 0x10FFFF
Ranges = tuple[tuple[int, int], ...]
"""A character class: sorted, disjoint, non-adjacent inclusive ranges of code points."""


class RegexError(ValueError):
    """A pattern that Go's regexp would not compile either."""


class Unsupported(RegexError):
    """RE2 syntax this module does not take (flags, ``\\b``, ``\\p``, octal, ``\\Q``)."""


class TooLarge(RegexError):
    """A pattern longer, deeper or with more states than this module runs."""


def _norm(ranges: list[tuple[int, int]]) -> Ranges:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return tuple(out)


def _negate(ranges: Ranges) -> Ranges:
    out, nxt = [], 0
    for lo, hi in ranges:
        if lo > nxt:
            out.append((nxt, lo - 1))
        nxt = hi + 1
    if nxt <= _MAX_RUNE:
        out.append((nxt, _MAX_RUNE))
    return tuple(out)


def _chars(text: str) -> Ranges:
    return _norm([(ord(c), ord(c)) for c in text])


_DIGIT: Ranges = ((48, 57),)
_WORD = _norm([(48, 57), (65, 90), (95, 95), (97, 122)])
_SPACE = _chars("\t\n\f\r ")  # Go's \s: no \v
_PERL = {"d": _DIGIT, "w": _WORD, "s": _SPACE}
_DOT = _negate(_chars("\n"))
_SIMPLE = {"t": "\t", "n": "\n", "r": "\r", "f": "\f", "v": "\v", "a": "\a"}
_POSIX = {
    "alnum": _norm([(48, 57), (65, 90), (97, 122)]), "alpha": _norm([(65, 90), (97, 122)]),
    "ascii": ((0, 127),), "blank": _chars("\t "), "cntrl": ((0, 31), (127, 127)),
    "digit": _DIGIT, "graph": ((33, 126),), "lower": ((97, 122),), "print": ((32, 126),),
    "punct": _norm([(33, 47), (58, 64), (91, 96), (123, 126)]),
    "space": _chars("\t\n\v\f\r "), "upper": ((65, 90),), "word": _WORD,
    "xdigit": _norm([(48, 57), (65, 70), (97, 102)]),
}


# -- the syntax tree ----------------------------------------------------------------

@dataclass(frozen=True)
class _Chars:
    ranges: Ranges


@dataclass(frozen=True)
class _Anchor:
    end: bool  # False: beginning of text, True: end of text


@dataclass(frozen=True)
class _Seq:
    items: tuple[_Node, ...]  # concatenation; empty: the empty string


@dataclass(frozen=True)
class _Alt:
    items: tuple[_Node, ...]


@dataclass(frozen=True)
class _Repeat:
    item: _Node
    min: int
    max: int | None  # None: no bound


_Node = _Chars | _Anchor | _Seq | _Alt | _Repeat


def _size(node: _Node) -> int:
    """The states ``node`` makes once built (repetitions spelled out)."""
    if isinstance(node, (_Chars, _Anchor)):
        return 1
    if isinstance(node, (_Seq, _Alt)):
        return sum(_size(n) for n in node.items)
    copies = node.max if node.max is not None else max(node.min, 1)
    return _size(node.item) * copies


class _Parser:
    """RE2's syntax (Go's ``regexp/syntax`` with its Perl flags, none set), recursive
    descent over the pattern's characters."""

    def __init__(self, pattern: str) -> None:
        self.p = pattern
        self.i = 0
        self.depth = 0

    def parse(self) -> _Node:
        node = self._alt()
        if self.i < len(self.p):  # only a ")" stops _alt early
            raise RegexError("unexpected )")
        return node

    def _peek(self) -> str:
        return self.p[self.i] if self.i < len(self.p) else ""

    def _alt(self) -> _Node:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise TooLarge(f"nested more than {MAX_DEPTH} deep")
        items = [self._seq()]
        while self._peek() == "|":
            self.i += 1
            items.append(self._seq())
        self.depth -= 1
        return items[0] if len(items) == 1 else _Alt(tuple(items))

    def _seq(self) -> _Node:
        items: list[_Node] = []
        while self._peek() not in ("", "|", ")"):
            atom = self._atom()
            items.append(self._quantified(atom))
        return items[0] if len(items) == 1 else _Seq(tuple(items))

    def _quantified(self, atom: _Node) -> _Node:
        repeated = False
        while True:
            ch = self._peek()
            if ch in ("*", "+", "?"):
                lo, hi, self.i = {"*": 0, "+": 1, "?": 0}[ch], (1 if ch == "?" else None), \
                    self.i + 1
            elif ch == "{" and (bounds := self._braces(self.i)) is not None:
                lo, hi = bounds
            else:
                return atom
            if repeated:  # Go (as Perl) refuses a** or a{2}*
                raise RegexError("invalid nested repetition operator")
            repeated = True
            if self._peek() == "?":
                self.i += 1  # lazy: the same set of matches
            atom = _Repeat(atom, lo, hi)

    def _braces(self, at: int) -> tuple[int, int | None] | None:
        """``{n}``, ``{n,}`` or ``{n,m}`` at ``at`` (consumed), else None: then the
        ``{`` is a literal, as in Go."""
        j = self.p.find("}", at)
        if j < 0:
            return None
        body = self.p[at + 1:j]
        lo_s, comma, hi_s = body.partition(",")
        if not (lo_s.isascii() and lo_s.isdigit()) or (
                hi_s and not (hi_s.isascii() and hi_s.isdigit())):
            return None
        lo = int(lo_s)
        hi = lo if not comma else (int(hi_s) if hi_s else None)
        if lo > MAX_REPEAT or (hi is not None and (hi > MAX_REPEAT or hi < lo)):
            raise RegexError("invalid repeat count")
        self.i = j + 1
        return lo, hi

    def _atom(self) -> _Node:
        ch = self.p[self.i]
        self.i += 1
        if ch == "(":
            return self._group()
        if ch == "[":
            return _Chars(self._class())
        if ch == ".":
            return _Chars(_DOT)
        if ch == "^":
            return _Anchor(False)
        if ch == "$":
            return _Anchor(True)
        if ch in "*+?" or (ch == "{" and self._braces(self.i - 1) is not None):
            raise RegexError("missing argument to repetition operator")
        if ch == "\\":
            return self._escape(in_class=False)
        return _Chars(((ord(ch), ord(ch)),))

    def _group(self) -> _Node:
        if self.p.startswith("?", self.i):
            rest = self.p[self.i + 1:]
            if rest.startswith(":"):
                self.i += 2
            elif rest.startswith(("P<", "<")):
                end = self.p.find(">", self.i)
                name = self.p[self.i + (3 if rest[0] == "P" else 2):end]
                if end < 0 or not name or not all(c.isalnum() or c == "_" for c in name):
                    raise RegexError("invalid named capture")
                self.i = end + 1
            elif rest[:1] and rest[0] in "imsU-":
                raise Unsupported("flags ((?i) and the like) are not supported")
            else:
                raise RegexError("invalid or unsupported Perl syntax")
        node = self._alt()
        if self._peek() != ")":
            raise RegexError("missing closing )")
        self.i += 1
        return node

    def _escape(self, *, in_class: bool) -> _Chars | _Anchor:
        if self.i >= len(self.p):
            raise RegexError("trailing backslash at end of expression")
        ch = self.p[self.i]
        self.i += 1
        if ch.lower() in _PERL:
            ranges = _PERL[ch.lower()]
            return _Chars(_negate(ranges) if ch.isupper() else ranges)
        if ch in _SIMPLE:
            return _Chars(_chars(_SIMPLE[ch]))
        if ch == "x":
            return _Chars(_chars(chr(self._hex())))
        if not in_class and ch in "Az":
            return _Anchor(ch == "z")
        if ch.isascii() and not ch.isalnum():
            return _Chars(_chars(ch))  # escaped punctuation (and _) stands for itself
        if ch in "bBpPQEC01234567":
            raise Unsupported(f"\\{ch} is not supported")
        raise RegexError(f"invalid escape sequence \\{ch}")

    def _hex(self) -> int:
        if self._peek() == "{":
            end = self.p.find("}", self.i)
            digits = self.p[self.i + 1:end] if end > 0 else ""
            self.i = end + 1
        else:
            digits = self.p[self.i:self.i + 2]
            self.i += 2
            if len(digits) != 2:
                raise RegexError("invalid escape sequence \\x")
        try:
            value = int(digits, 16) if digits and digits.isascii() and digits.isalnum() else -1
        except ValueError:
            value = -1
        if not 0 <= value <= _MAX_RUNE:
            raise RegexError("invalid escape sequence \\x")
        return value

    def _class(self) -> Ranges:
        negate = self._peek() == "^"
        if negate:
            self.i += 1
        ranges: list[tuple[int, int]] = []
        first = True
        while first or self._peek() != "]":
            if self.i >= len(self.p):
                raise RegexError("missing closing ]")
            first = False
            if self.p.startswith("[:", self.i):
                end = self.p.find(":]", self.i + 2)
                name = self.p[self.i + 2:end] if end > 0 else ""
                neg = name.startswith("^")
                known = _POSIX.get(name.lstrip("^"))
                if known is not None:
                    ranges += _negate(known) if neg else known
                    self.i = end + 2
                    continue
            lo = self._class_char(ranges)
            if lo is None:
                continue
            if self._peek() == "-" and self.p[self.i + 1:self.i + 2] not in ("]", ""):
                self.i += 1
                hi = self._class_char(ranges)
                if hi is None or hi < lo:
                    raise RegexError("invalid character class range")
                ranges.append((lo, hi))
            else:
                ranges.append((lo, lo))
        self.i += 1
        out = _norm(ranges)
        return _negate(out) if negate else out

    def _class_char(self, ranges: list[tuple[int, int]]) -> int | None:
        """One character of a class (its code point), or None once a class escape
        (``\\d``) has been added to ``ranges``."""
        ch = self.p[self.i]
        self.i += 1
        if ch != "\\":
            return ord(ch)
        start = self.i
        node = self._escape(in_class=True)
        assert isinstance(node, _Chars)
        if len(node.ranges) == 1 and node.ranges[0][0] == node.ranges[0][1] and (
                self.p[start].lower() not in _PERL):
            return node.ranges[0][0]
        ranges += node.ranges
        return None


# -- the automaton ----------------------------------------------------------------

_CHAR, _BOT, _EOT = 0, 1, 2  # what a state matches: a character, or a sentinel
_Built = tuple[bool, int, int]
"""A part of the automaton: whether it matches the empty string, and the masks of the
states that may start and end a match of it."""


class _Builder:
    """Glushkov's construction: each character position of the pattern a state (state
    0 the start), with the states that may follow it as a bit mask."""

    def __init__(self) -> None:
        self.kinds = [_CHAR]
        self.classes: list[Ranges] = [()]
        self.follow = [0]

    def _state(self, kind: int, ranges: Ranges) -> int:
        self.kinds.append(kind)
        self.classes.append(ranges)
        self.follow.append(0)
        return 1 << (len(self.follow) - 1)

    def _link(self, last: int, first: int) -> None:
        """Let every state of ``last`` be followed by every state of ``first``."""
        follow = self.follow
        while last:
            low = last & -last
            follow[low.bit_length() - 1] |= first
            last ^= low

    def build(self, node: _Node) -> _Built:
        """States for ``node``."""
        if isinstance(node, _Chars):
            bit = self._state(_CHAR, node.ranges)
            return False, bit, bit
        if isinstance(node, _Anchor):
            bit = self._state(_EOT if node.end else _BOT, ())
            return False, bit, bit
        if isinstance(node, _Alt):
            nullable, first, last = False, 0, 0
            for item in node.items:
                n, f, la = self.build(item)
                nullable, first, last = nullable or n, first | f, last | la
            return nullable, first, last
        if isinstance(node, _Seq):
            return self._seq([functools.partial(self.build, item) for item in node.items])
        return self._repeat(node)

    def _seq(self, parts: list[Callable[[], _Built]]) -> _Built:
        nullable, first, last = True, 0, 0
        for part in parts:
            n, f, la = part()
            self._link(last, f)
            first = first | f if nullable else first
            last = la | last if n else la
            nullable = nullable and n
        return nullable, first, last

    def _repeat(self, node: _Repeat) -> _Built:
        """``x{n,m}`` as ``n`` copies of ``x`` then ``m - n`` optional ones; ``x{n,}`` as
        ``n - 1`` copies then ``x+`` (each copy states of its own)."""
        def copy() -> _Built:
            return self.build(node.item)

        def loop() -> _Built:
            n, f, la = self.build(node.item)
            self._link(la, f)
            return n, f, la

        def optional() -> _Built:
            _, f, la = self.build(node.item)
            return True, f, la

        if node.max is None:
            parts = [copy] * (node.min - 1) + [loop]
            nullable, first, last = self._seq(parts)
            return nullable or node.min == 0, first, last
        return self._seq([copy] * node.min + [optional] * (node.max - node.min))


def compile(pattern: str, max_positions: int = MAX_POSITIONS) -> Regex:
    """``pattern`` ready to search; :class:`RegexError` if Go would not compile it,
    :class:`Unsupported` or :class:`TooLarge` (over :data:`MAX_PATTERN` characters or
    ``max_positions`` states) if lamina will not."""
    if len(pattern) > MAX_PATTERN:
        raise TooLarge(f"a pattern of {len(pattern)} characters (at most {MAX_PATTERN})")
    node = _Parser(pattern).parse()
    size = _size(node)
    if size > max_positions:
        raise TooLarge(f"a pattern of {size} states once its repetitions are spelled out "
                       f"(at most {max_positions})")
    return Regex(pattern, node)


class Regex:
    """A compiled pattern; :meth:`search` is Go's ``MatchString``."""

    def __init__(self, pattern: str, node: _Node) -> None:
        self.pattern = pattern
        b = _Builder()
        nullable, first, last = b.build(node)
        b.follow[0] = first
        self.size = len(b.follow) - 1
        self._nullable = nullable
        self._final = last
        self._bot = sum(1 << i for i, k in enumerate(b.kinds) if k == _BOT)
        self._eot = sum(1 << i for i, k in enumerate(b.kinds) if k == _EOT)
        # As many sentinels as anchors: ^^a matches "a", each ^ takes one.
        self._n_bot, self._n_eot = self._bot.bit_count(), self._eot.bit_count()
        # Only ^ can start a match: once past the beginning with no state left, none.
        self._anchored = first != 0 and first & ~self._bot == 0
        by_class: dict[Ranges, int] = {}
        for i, kind in enumerate(b.kinds):
            if kind == _CHAR and i:
                by_class[b.classes[i]] = by_class.get(b.classes[i], 0) | 1 << i
        self._classes = [(tuple(lo for lo, _ in r), tuple(hi for _, hi in r), mask)
                         for r, mask in by_class.items()]
        self._masks: dict[str, int] = {}
        self._nbytes = (len(b.follow) + 7) // 8
        self._tables = [self._table(b.follow, k) for k in range(self._nbytes)]
        self._next: dict[tuple[int, str], int] = {}

    @staticmethod
    def _table(follow: list[int], k: int) -> list[int]:
        """The states that follow each of the 256 sets of states ``8k`` to ``8k + 7``."""
        table = [0] * 256
        for byte in range(1, 256):
            low = byte & -byte
            i = 8 * k + low.bit_length() - 1
            table[byte] = table[byte ^ low] | (follow[i] if i < len(follow) else 0)
        return table

    def _follow(self, states: int) -> int:
        out = 0
        tables = self._tables
        for k, byte in enumerate(states.to_bytes(self._nbytes, "little")):
            if byte:
                out |= tables[k][byte]
        return out

    def _mask(self, ch: str) -> int:
        """The states whose class holds ``ch``."""
        mask = self._masks.get(ch)
        if mask is None:
            c = ord(ch)
            mask = 0
            for los, his, states in self._classes:
                i = bisect.bisect_right(los, c) - 1
                if i >= 0 and c <= his[i]:
                    mask |= states
            if len(self._masks) >= MAX_CACHE:
                self._masks.clear()
            self._masks[ch] = mask
        return mask

    def search(self, text: str) -> bool:
        """Whether ``text`` holds a match anywhere (Go's ``MatchString``): time linear
        in ``len(text)``, times at most ``size / 8`` table look-ups a character."""
        if self._nullable:
            return True
        final, follow = self._final, self._follow
        states = 0
        if not text:  # beginning and end are one place: anchors hold in any order ($^)
            for _ in range(self._n_bot + self._n_eot):
                states = follow(states | 1) & (self._bot | self._eot)
                if states & final:
                    return True
            return False
        for _ in range(self._n_bot):
            states = follow(states | 1) & self._bot
            if states & final:
                return True
        nxt, anchored = self._next, self._anchored
        for ch in text:
            key = (states, ch)
            got = nxt.get(key)
            if got is None:
                if len(nxt) >= MAX_CACHE:
                    nxt.clear()  # as RE2's DFA: start over rather than grow
                got = nxt[key] = follow(states | 1) & self._mask(ch)
            states = got
            if states & final:
                return True
            if not states and anchored:
                return False
        for _ in range(self._n_eot):
            states = follow(states | 1) & self._eot
            if states & final:
                return True
        return False
