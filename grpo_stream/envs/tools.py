"""Tools the model may call: OpenAI-style function schemas, calls parsed from the
model's text, and run under a deadline with their results checked.

    add = Tool("add", "Add two numbers.", {"type": "object", "properties": {...}}, fn)
    add.schema()          # {"type": "function", "function": {"name": "add", ...}}
    call = parse_tool_call(text)   # ToolCall, None (no call), or ToolCallError
    result = await run_tool(add, call.arguments, timeout_s=5, max_chars=2000)

A call is written the Hermes way, `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`,
the format chat templates with tool support use. A malformed call is the model's mistake,
not the tool's: the environment tells the model (`ToolCallError`'s message). A tool that
raises, runs past `timeout_s` or returns something that is neither text nor JSON (or is
longer than `max_chars`) raises `EpisodeFailed`, naming the tool and why. A synchronous
tool runs in a daemon thread, so one that hangs keeps no process from exiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from grpo_stream.envs.base import EpisodeFailed

CALL_RE = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]  # JSON schema of the arguments object
    fn: Callable[..., Any]  # fn(**arguments) -> str | JSON value; may be async

    def schema(self) -> dict[str, Any]:
        """The OpenAI function schema (`tokenizer.apply_chat_template(tools=[...])`)."""
        fn = {"name": self.name, "description": self.description, "parameters": self.parameters}
        return {"type": "function", "function": fn}


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]


class ToolCallError(ValueError):
    """The model's tool call is malformed; the message is what the model is told."""


def parse_tool_call(text: str) -> ToolCall | None:
    """The first `<tool_call>` in `text`, None when there is none; ToolCallError when
    it is not a JSON object {"name": str, "arguments": object}."""
    m = CALL_RE.search(text)
    if m is None:
        return None
    try:
        obj = json.loads(m.group(1).strip())
    except json.JSONDecodeError as e:
        raise ToolCallError(f"invalid tool call: not JSON ({e.msg})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        raise ToolCallError('invalid tool call: expected {"name": ..., "arguments": {...}}')
    args = obj.get("arguments", {})
    if not isinstance(args, dict):
        raise ToolCallError("invalid tool call: arguments must be a JSON object")
    return ToolCall(obj["name"], args)


def check_arguments(tool: Tool, arguments: dict) -> None:
    """ToolCallError (told to the model) for arguments the schema does not allow:
    unknown names, missing required ones."""
    props = tool.parameters.get("properties", {})
    unknown = sorted(set(arguments) - set(props))
    missing = sorted(set(tool.parameters.get("required", [])) - set(arguments))
    if unknown or missing:
        raise ToolCallError(
            f"invalid call of {tool.name}: unknown arguments {unknown}, missing {missing}"
        )


def _in_daemon_thread(fn: Callable[..., Any], args: dict) -> asyncio.Future:
    """fn(**args) in a daemon thread; the future resolves on the running loop."""
    loop = asyncio.get_running_loop()
    fut = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if not fut.done():
            (fut.set_result if ok else fut.set_exception)(value)

    def work() -> None:
        try:
            result = (True, fn(**args))
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting episode
            result = (False, e)
        # a late result of a tool that hung: its episode has failed, the loop may be gone
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, *result)

    threading.Thread(target=work, name=f"tool-{getattr(fn, '__name__', 'fn')}", daemon=True).start()
    return fut


def check_result(tool: str, out: Any, max_chars: int) -> str:
    """A tool's return value as the text the model reads; EpisodeFailed if garbage."""
    if isinstance(out, str):
        text = out
    else:
        try:
            text = json.dumps(out, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise EpisodeFailed(
                f"tool {tool!r} returned garbage: {type(out).__name__} is not text or JSON ({e})"
            ) from None
    if len(text) > max_chars:
        raise EpisodeFailed(
            f"tool {tool!r} returned garbage: {len(text)} characters (env.max_tool_chars="
            f"{max_chars})"
        )
    if any(not (c.isprintable() or c in "\n\t") for c in text):
        raise EpisodeFailed(f"tool {tool!r} returned garbage: unprintable characters")
    return text


async def run_tool(tool: Tool, arguments: dict, timeout_s: float, max_chars: int) -> str:
    """The tool's result as text, within `timeout_s`; EpisodeFailed naming why not."""
    if inspect.iscoroutinefunction(tool.fn):
        pending = asyncio.ensure_future(tool.fn(**arguments))
    else:
        pending = _in_daemon_thread(tool.fn, arguments)
    try:
        out = await asyncio.wait_for(pending, timeout_s)
    except TimeoutError:
        raise EpisodeFailed(
            f"tool {tool.name!r} hung: no result in {timeout_s:g} s (env.tool_timeout_s)"
        ) from None
    except asyncio.CancelledError:
        raise
    except Exception as e:  # noqa: BLE001 - any tool error ends the episode, with its reason
        raise EpisodeFailed(f"tool {tool.name!r} raised {type(e).__name__}: {e}") from e
    return check_result(tool.name, out, max_chars)
