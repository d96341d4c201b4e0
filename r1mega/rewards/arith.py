"""A safe evaluator for arithmetic written by a model: a tokenizer and a recursive-descent parser.

Integers and decimals, + - * / (× and ÷ as aliases), unary minus and plus, parentheses;
exact arithmetic with fractions. Nothing is handed to eval, exec, compile or ast. Input
length, nesting depth and literal size are bounded, so no string can exhaust time or memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction

MAX_CHARS = 512
MAX_DEPTH = 32
MAX_DIGITS = 30
_ALIASES = {"×": "*", "÷": "/", "−": "-", "·": "*"}
_OPS = frozenset("+-*/()")
_DIGITS = frozenset("0123456789.")
# With at most MAX_CHARS characters no honest value gets near this; it only guards the gcds.
_MAX_MAGNITUDE = 10 ** (2 * MAX_CHARS)

Number = int | Fraction
Token = tuple[str, str]  # ("num", "12.5") or ("op", "+")


class ExpressionError(ArithmeticError):
    """Text that is not a well-formed, bounded arithmetic expression, or that divides by zero."""


@dataclass
class Parsed:
    """An expression's exact value and the number literals it uses, in order."""

    value: Fraction
    numbers: list[Number] = field(default_factory=list)


def _number_end(expr: str, i: int) -> int:
    j = i
    while j < len(expr) and expr[j] in _DIGITS:
        j += 1
    return j


def tokenize(expr: str) -> list[Token]:
    """The expression's tokens; ExpressionError on an unknown character or a bad or oversized number."""
    if len(expr) > MAX_CHARS:
        raise ExpressionError(f"expression longer than {MAX_CHARS} characters ({len(expr)})")
    out: list[Token] = []
    i = 0
    while i < len(expr):
        c = _ALIASES.get(expr[i], expr[i])
        if c.isspace():
            i += 1
        elif c in _OPS:
            out.append(("op", c))
            i += 1
        elif c in _DIGITS:
            j = _number_end(expr, i)
            text = expr[i:j]
            if text.count(".") > 1 or text == ".":
                raise ExpressionError(f"malformed number {text[:40]!r}")
            if len(text.replace(".", "")) > MAX_DIGITS:
                raise ExpressionError(f"number with more than {MAX_DIGITS} digits")
            out.append(("num", text))
            i = j
        else:
            raise ExpressionError(f"unexpected character {c!r} at position {i}")
    return out


class _Parser:
    """expression := term (('+'|'-') term)*; term := factor (('*'|'/') factor)*;
    factor := ('-'|'+') factor | '(' expression ')' | number."""

    def __init__(self, tokens: list[Token]):
        self.tokens, self.pos, self.numbers = tokens, 0, []

    def peek(self) -> Token:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else ("end", "")

    def take(self) -> Token:
        tok = self.peek()
        self.pos += 1
        return tok

    def expression(self, depth: int) -> Fraction:
        return self._chain(depth, "+-", self.term)

    def term(self, depth: int) -> Fraction:
        return self._chain(depth, "*/", self.factor)

    def _chain(self, depth: int, ops: str, operand) -> Fraction:
        """operand (op operand)*, left to right, for the operators of one precedence level."""
        value = operand(depth)
        while self.peek()[0] == "op" and self.peek()[1] in ops:
            op = self.take()[1]
            rhs = operand(depth)
            if op == "/" and rhs == 0:
                raise ExpressionError("division by zero")
            value = _bounded(_APPLY[op](value, rhs))
        return value

    def factor(self, depth: int) -> Fraction:
        if depth > MAX_DEPTH:
            raise ExpressionError(f"nested deeper than {MAX_DEPTH} levels")
        kind, text = self.take()
        if kind == "op" and text in "+-":
            value = self.factor(depth + 1)
            return -value if text == "-" else value
        if (kind, text) == ("op", "("):
            value = self.expression(depth + 1)
            if self.take() != ("op", ")"):
                raise ExpressionError("missing ')'")
            return value
        if kind == "num":
            value = Fraction(text)
            self.numbers.append(int(text) if "." not in text else value)
            return value
        raise ExpressionError(f"unexpected {text!r}" if text else "unexpected end of expression")


_APPLY = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y, "/": lambda x, y: x / y}


def _bounded(value: Fraction) -> Fraction:
    if abs(value.numerator) > _MAX_MAGNITUDE or value.denominator > _MAX_MAGNITUDE:
        raise ExpressionError("intermediate value too large")
    return value


def parse(expr: str) -> Parsed:
    """Value and number literals of an arithmetic expression; ExpressionError if it is not one."""
    parser = _Parser(tokenize(expr))
    if not parser.tokens:
        raise ExpressionError("empty expression")
    value = parser.expression(0)
    if parser.pos != len(parser.tokens):
        raise ExpressionError(f"unexpected {parser.peek()[1]!r} after the expression")
    return Parsed(value, parser.numbers)


def evaluate(expr: str) -> Fraction:
    """The exact value of an arithmetic expression; ExpressionError if it is not one."""
    return parse(expr).value


def numbers_in(expr: str) -> list[Number]:
    """The number literals of a valid expression, in order: int for integers, Fraction for decimals."""
    return parse(expr).numbers
