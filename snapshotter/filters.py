"""containerd's filter syntax (github.com/containerd/containerd/filters), as List receives it.

    filters   := selectors ; a request's filters are OR-ed
    selectors := selector ("," selector)*            all must match
    selector  := fieldpath [operator value]          no operator: the field is present
    fieldpath := field ("." field)*
    field     := quoted | [A-Za-z0-9_-]+
    operator  := "==" | "!=" | "~=" | "@="           equal, not equal, regexp, contains
    value     := quoted | [^\\s,]+
    quoted    := a Go string literal quoted with ", / or | (the latter two for regexps)

Like containerd: `!=` also matches an absent field, `~=` searches (not anchored), and a
regular expression that does not compile is a parse error. Python's `re` stands in for Go's
RE2; the two agree on the expressions filters use in practice.

The object being filtered is seen through an adaptor: a function from a field path to
`(value, present)`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from snapshotter.errors import InvalidArgument

Adaptor = Callable[[Sequence[str]], tuple[str, bool]]


class Filter:
    """Matches everything; the base of the real filters."""

    def match(self, adaptor: Adaptor) -> bool:
        return True


ALWAYS = Filter()


@dataclass(frozen=True)
class _Selector(Filter):
    fieldpath: tuple[str, ...]
    operator: str  # "", "==", "!=", "~=", "@="
    value: str = ""
    regexp: re.Pattern[str] | None = None

    def match(self, adaptor: Adaptor) -> bool:
        value, present = adaptor(self.fieldpath)
        if self.operator == "":
            return present
        if self.operator == "==":
            return present and value == self.value
        if self.operator == "!=":
            return value != self.value
        if self.operator == "@=":
            return self.value in value
        assert self.regexp is not None
        return self.regexp.search(value) is not None


@dataclass(frozen=True)
class _All(Filter):
    parts: tuple[Filter, ...]

    def match(self, adaptor: Adaptor) -> bool:
        return all(p.match(adaptor) for p in self.parts)


@dataclass(frozen=True)
class _Any(Filter):
    parts: tuple[Filter, ...]

    def match(self, adaptor: Adaptor) -> bool:
        return any(p.match(adaptor) for p in self.parts)


def parse_all(exprs: Sequence[str]) -> Filter:
    """A filter matching when any expression matches; no expressions match everything."""
    if not exprs:
        return ALWAYS
    return _Any(tuple(parse(e) for e in exprs))


def parse(expr: str) -> Filter:
    """One expression; raises InvalidArgument with containerd's kind of message."""
    if expr == "":
        return ALWAYS
    return _Parser(expr).selectors()


_OPERATORS = ("==", "!=", "~=", "@=")
_QUOTES = '"/|'
_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\"}


def _is_field_char(c: str) -> bool:
    return c.isascii() and (c.isalnum() or c in "-_")


class _Parser:
    """Scanner and recursive-descent parser in one; `pos` indexes the input string."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def selectors(self) -> Filter:
        parts: list[Filter] = [self._selector()]
        while True:
            c = self._peek()
            if c == "":
                return _All(tuple(parts))
            if c != ",":
                raise self._error(f"unexpected input: {c}")
            self.pos += 1
            parts.append(self._selector())

    def _selector(self) -> Filter:
        fieldpath = [self._field()]
        while self._peek() == ".":
            self.pos += 1
            fieldpath.append(self._field())
        if self._peek() in ("", ","):
            return _Selector(tuple(fieldpath), "")
        op = self._operator()
        value = self._value()
        regexp = None
        if op == "~=":
            try:
                regexp = re.compile(value)
            except re.error as exc:
                raise self._error(f"bad regular expression {value!r}: {exc}") from exc
        return _Selector(tuple(fieldpath), op, value, regexp)

    def _field(self) -> str:
        c = self._peek()
        if c and c in _QUOTES:
            return self._quoted()
        start = self.pos
        while self.pos < len(self.text) and _is_field_char(self.text[self.pos]):
            self.pos += 1
        if self.pos == start:
            raise self._error("expected field or quoted")
        return self.text[start : self.pos]

    def _operator(self) -> str:
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] in "=!~@":
            self.pos += 1
        op = self.text[start : self.pos]
        if op not in _OPERATORS:
            self.pos = start
            raise self._error('expected an operator ("=="|"!="|"~="|"@=")')
        return op

    def _value(self) -> str:
        c = self._peek()
        if c == "":
            raise self._error("unexpected end of input, expected value")
        if c in _QUOTES:
            return self._quoted()
        start = self.pos
        while self.pos < len(self.text) and not (
            self.text[self.pos] == "," or self.text[self.pos].isspace()
        ):
            self.pos += 1
        if self.pos == start:
            raise self._error("expected value or quoted")
        return self.text[start : self.pos]

    def _quoted(self) -> str:
        quote = self.text[self.pos]
        start = self.pos
        self.pos += 1
        out: list[str] = []
        while True:
            if self.pos >= len(self.text) or self.text[self.pos] == "\n":
                self.pos = start
                raise self._error("quoted literal not terminated")
            c = self.text[self.pos]
            self.pos += 1
            if c == quote:
                return "".join(out)
            if c != "\\":
                out.append(c)
                continue
            out.append(self._escape(quote))

    def _escape(self, quote: str) -> str:
        if self.pos >= len(self.text):
            raise self._error("illegal escape sequence")
        c = self.text[self.pos]
        self.pos += 1
        if c in _ESCAPES:
            return _ESCAPES[c]
        if c == quote:
            return c
        width = {"x": 2, "u": 4, "U": 8}.get(c)
        digits, base = (self.text[self.pos : self.pos + width], 16) if width else ("", 0)
        if c in "01234567":
            digits, base = self.text[self.pos - 1 : self.pos + 2], 8
            self.pos -= 1
            width = 3
        try:
            if width is None or len(digits) != width:
                raise ValueError(c)
            code = int(digits, base)
            self.pos += width
            return chr(code)
        except ValueError:
            raise self._error("illegal escape sequence") from None

    def _peek(self) -> str:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def _error(self, msg: str) -> InvalidArgument:
        t, p = self.text, self.pos
        where = f"[{t[:p]} >|{t[p : p + 1]}|< {t[p + 1 :]}]" if p < len(t) else f"[{t}]"
        return InvalidArgument(f"filters: parse error: {where}: {msg}")
