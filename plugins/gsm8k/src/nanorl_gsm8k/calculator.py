"""The calculator the model calls while it solves a GSM8K problem (`<|python_start|>48/2<|python_end|>`).

It evaluates arithmetic only: numbers, + - * / // % **, unary signs and parentheses, read with `ast` and
computed here. Nothing is passed to `eval`: a model writes whatever it samples, and a name, a call or an
attribute is refused. Sizes are bounded too, so that `9**9**9` cannot hang a rollout.
"""

from __future__ import annotations

import ast
import math
import operator
import re

MAX_CHARS = 200  # GSM8K's longest calculator note is under 100 characters
MAX_EXPONENT = 64  # a grade-school power is small; 2**64 already exceeds every GSM8K number
MAX_MAGNITUDE = 1e18  # beyond any GSM8K quantity, and small enough that no intermediate grows huge
DECIMALS = 6  # places a non-integral result is rounded to (GSM8K's notes round to 2 at most)

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
# thousands separators inside a number (1,000 -> 1000) and a currency sign before one ($5 -> 5)
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")
_CURRENCY = re.compile(r"\$(?=\s*[\d.(])")


class CalculatorError(ValueError):
    """The expression is not arithmetic the calculator computes (the engine shows the model `error: ...`)."""


def calculate(expression: str) -> str:
    """The value of an arithmetic expression as GSM8K writes numbers: an integer without a point, else at most
    six decimals without trailing zeros ("48/2" -> "24", "12/60" -> "0.2", "10/3" -> "3.333333")."""
    text = expression.strip()
    if len(text) > MAX_CHARS:
        raise CalculatorError(f"expression longer than {MAX_CHARS} characters")
    text = _CURRENCY.sub("", _THOUSANDS.sub("", text)).replace("×", "*").replace("÷", "/")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as e:
        raise CalculatorError(f"not an arithmetic expression: {expression!r}") from e
    return format_number(_value(tree.body))


def format_number(x: float | int) -> str:
    if isinstance(x, int) or float(x).is_integer():
        return str(int(x))
    text = f"{x:.{DECIMALS}f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text  # a tiny negative rounds to zero, not "-0"


def _value(node: ast.AST) -> float | int:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return _checked(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_value(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _value(node.left), _value(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise CalculatorError(f"exponent {right} is larger than {MAX_EXPONENT}")
        try:
            return _checked(_BINARY[type(node.op)](left, right))
        except ZeroDivisionError as e:
            raise CalculatorError("division by zero") from e
        except OverflowError as e:
            raise CalculatorError("result too large") from e
    raise CalculatorError(f"only numbers and + - * / // % ** are allowed, not {type(node).__name__}")


def _checked(x):
    if isinstance(x, complex) or (isinstance(x, float) and not math.isfinite(x)) or abs(x) > MAX_MAGNITUDE:
        raise CalculatorError("result out of range")
    return x
