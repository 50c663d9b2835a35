"""Countdown puzzles: build always-solvable problems, and check answers safely.

`make_problem(rng, ...)` draws numbers and builds the target from a random expression
over all of them, so every problem has a known solution. `evaluate(expr)` parses an
arithmetic expression with `ast` against a whitelist (integers, + - * /, parentheses)
and evaluates it exactly with `Fraction`: no `eval`, nothing but arithmetic runs.
`find_expressions(text)` pulls candidate expressions out of a chatty completion.
"""

from __future__ import annotations

import ast
import operator
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

MAX_EXPRESSION_CHARS = 200  # longer candidates are not parsed (bounds parse time)
MAX_BUILD_TRIES = 100

_AST_OPS: dict[type, Callable[[Fraction, Fraction], Fraction]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
}
_SYMBOLS: dict[str, Callable[[int, int], int | None]] = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b if a >= b else None,
    "*": lambda a, b: a * b,
    "/": lambda a, b: a // b if b and a % b == 0 else None,
}
_CANDIDATE = re.compile(r"[\d\s()+\-*/×÷]+")


@dataclass(frozen=True)
class Problem:
    numbers: list[int]
    target: int
    solution: str  # uses every number once and evaluates to target


@dataclass(frozen=True)
class Parsed:
    numbers: list[int]  # the integer literals, in order of appearance
    value: Fraction | None  # None: division by zero


def _combine(rng: random.Random, items: list[tuple[int, str]]) -> tuple[int, str] | None:
    """Fold the (value, expression) items with random ops; None if a step is not integral."""
    items = list(items)
    while len(items) > 1:
        i, j = rng.sample(range(len(items)), 2)
        (a, ea), (b, eb) = items[i], items[j]
        op = rng.choice(list(_SYMBOLS))
        value = _SYMBOLS[op](a, b)
        if value is None:
            return None
        items = [it for k, it in enumerate(items) if k not in (i, j)]
        items.append((value, f"({ea}{op}{eb})"))
    return items[0]


def make_problem(rng: random.Random, count: int, low: int, high: int, max_target: int) -> Problem:
    numbers = [rng.randint(low, high) for _ in range(count)]
    for _ in range(MAX_BUILD_TRIES):
        built = _combine(rng, [(n, str(n)) for n in numbers])
        if built is not None and 0 < built[0] <= max_target:
            return Problem(numbers, built[0], built[1][1:-1])
    # the sum is always a valid (if dull) solution
    return Problem(numbers, sum(numbers), "+".join(map(str, numbers)))


def _eval_node(node: ast.AST, found: list[int]) -> Fraction:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        found.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _AST_OPS:
        left = _eval_node(node.left, found)
        right = _eval_node(node.right, found)
        return _AST_OPS[type(node.op)](left, right)
    raise ValueError(f"not allowed in an expression: {type(node).__name__}")


def parse(expr: str) -> Parsed | None:
    """The literals and exact value of `expr`, or None if it is not plain arithmetic."""
    expr = expr.replace("×", "*").replace("÷", "/").strip()
    if not expr or len(expr) > MAX_EXPRESSION_CHARS:
        return None
    try:
        tree = ast.parse(expr, mode="eval")
    except (SyntaxError, ValueError):
        return None
    found: list[int] = []
    try:
        value: Fraction | None = _eval_node(tree.body, found)
    except ZeroDivisionError:
        value = None
    except ValueError:
        return None
    return Parsed(found, value)


def find_expressions(text: str) -> list[Parsed]:
    """Every parseable arithmetic run in `text` (split at '='), in order of appearance."""
    out = []
    for piece in text.split("="):
        for match in _CANDIDATE.finditer(piece):
            parsed = parse(match.group())
            if parsed is not None:
                out.append(parsed)
    return out
