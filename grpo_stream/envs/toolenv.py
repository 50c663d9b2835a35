"""Environments built on tools, and the shipped ones.

`ToolEnv` answers a model turn that holds a `<tool_call>` with the tool's result (a
"tool" message) and ends the episode on a turn without one; the reward functions then
score that last turn. A malformed call, an unknown tool or wrong arguments are told to
the model; a tool that raises, hangs or returns garbage fails the episode
(`envs.tools.run_tool`).

  calculator  arithmetic with a `calculator(expression)` tool (long products are hard
              for a small model in one shot, easy with the tool)
  retry       no tools: a wrong answer gets "That is not right. Try again." until the
              turns run out (the model's later turns see its earlier ones)

    env = calculator(EpisodeLimits())
"""

from __future__ import annotations

import ast
import operator

from grpo_stream.envs.base import Done, EpisodeLimits, Reply
from grpo_stream.envs.tools import Tool, ToolCallError, check_arguments, parse_tool_call, run_tool
from grpo_stream.tasks.prompt import Prompt
from grpo_stream.tasks.rewards import numeric_answer


class ToolEnv:
    """Tool calls answered with results; a turn without a call ends the episode."""

    def __init__(self, tools: list[Tool], limits: EpisodeLimits, system: str | None = None):
        self.tools, self.limits, self.system = tools, limits, system
        self._by_name = {t.name: t for t in tools}

    def start(self, prompt: Prompt) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return [*head, {"role": "user", "content": prompt.text}]

    async def respond(self, prompt: Prompt, messages: list[dict], text: str) -> Reply | Done:
        try:
            call = parse_tool_call(text)
            if call is None:
                return Done()
            tool = self._by_name.get(call.name)
            if tool is None:
                raise ToolCallError(f"unknown tool {call.name!r}; tools: {sorted(self._by_name)}")
            check_arguments(tool, call.arguments)
        except ToolCallError as e:
            return Reply([{"role": "tool", "content": str(e)}])
        lim = self.limits
        result = await run_tool(tool, call.arguments, lim.tool_timeout_s, lim.max_tool_chars)
        return Reply([{"role": "tool", "content": result}])


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
        ast.Div: operator.truediv, ast.USub: operator.neg, ast.UAdd: operator.pos}  # fmt: skip


def _eval(node: ast.AST) -> float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_eval(node.left), _eval(node.right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_eval(node.operand))
    raise ValueError("only numbers, + - * / and parentheses")


def calculate(expression: str) -> str:
    """The value of an arithmetic expression as text; a bad one gets "error: ..." (the
    model's mistake, told to it, not the tool's failure)."""
    if not isinstance(expression, str) or len(expression) > 200:
        return "error: expression must be text of at most 200 characters"
    try:
        value = _eval(ast.parse(expression, mode="eval").body)
    except (SyntaxError, ValueError) as e:
        return f"error: {e.msg if isinstance(e, SyntaxError) else e}"
    except ZeroDivisionError:
        return "error: division by zero"
    return str(int(value)) if float(value).is_integer() else f"{value:.6g}"


CALCULATOR = Tool(
    "calculator",
    "Evaluate an arithmetic expression with + - * / and parentheses.",
    {
        "type": "object",
        "properties": {"expression": {"type": "string", "description": "e.g. 347*89"}},
        "required": ["expression"],
    },
    calculate,
)


def calculator(limits: EpisodeLimits) -> ToolEnv:
    return ToolEnv([CALCULATOR], limits)


class RetryEnv:
    """No tools: a wrong answer is told so, and the model tries again."""

    tools: list = []
    AGAIN = "That is not right. Try again. Reply with only the number."

    def __init__(self, limits: EpisodeLimits):
        self.limits = limits

    def start(self, prompt: Prompt) -> list[dict[str, str]]:
        return [{"role": "user", "content": prompt.text}]

    async def respond(self, prompt: Prompt, messages: list[dict], text: str) -> Reply | Done:
        if numeric_answer(text, prompt) > 0:
            return Done()
        return Reply([{"role": "user", "content": self.AGAIN}])


def retry(limits: EpisodeLimits) -> RetryEnv:
    return RetryEnv(limits)
