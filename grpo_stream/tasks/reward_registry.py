"""The reward function interface: registry, decorators, import paths, and one call.

A reward function scores completions of one prompt, sync or `async def`:

    @reward("my_reward")                       # per sample
    def my_reward(completion: str, prompt: Prompt, **kwargs) -> float: ...

    @group_reward("my_group_reward")           # the whole group at once
    async def my_group(completions: list[str], prompt: Prompt, **kwargs) -> list[float]: ...

Config names a function by its registered name, or by an import path,
"package.module:function" or "path/to/file.py:function" (a decorator without a name
only marks the kind; an unmarked function is per sample). `call_reward` applies one
function to a group and returns, per completion, a float or an error string: it never
raises for the function's own failures.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import importlib.util
import inspect
import math
import numbers
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

RewardKind = Literal["sample", "group"]
Outcome = float | str  # a finite score, or the reason it failed ("ValueError: ...")
_KIND_ATTR = "_grpo_reward_kind"


@dataclass(frozen=True)
class RegisteredReward:
    name: str
    fn: Callable[..., Any]
    kind: RewardKind
    inline: bool  # pure, cannot hang: may run in a thread of the caller, not a worker
    validate: Callable[[dict[str, Any]], None] | None  # raises ValueError on bad kwargs


REWARDS: dict[str, RegisteredReward] = {}


def _register(kind: RewardKind, name: str | None, inline: bool, validate: Any) -> Callable:
    def decorate(fn: Callable) -> Callable:
        setattr(fn, _KIND_ATTR, kind)
        if name is not None:
            if name in REWARDS and REWARDS[name].fn is not fn:
                raise ValueError(f"reward {name!r} is already registered")
            REWARDS[name] = RegisteredReward(name, fn, kind, inline, validate)
        return fn

    return decorate


def reward(name: str | None = None, *, inline: bool = False, validate: Any = None) -> Callable:
    """Register a per-sample reward `fn(completion, prompt, **kwargs) -> float`."""
    return _register("sample", name, inline, validate)


def group_reward(
    name: str | None = None, *, inline: bool = False, validate: Any = None
) -> Callable:
    """Register a group reward `fn(completions, prompt, **kwargs) -> list[float]`."""
    return _register("group", name, inline, validate)


def reward_kind(fn: Callable) -> RewardKind:
    return getattr(fn, _KIND_ATTR, "sample")


def is_import_path(name: str) -> bool:
    return ":" in name


def split_import_path(spec: str) -> tuple[str, str]:
    module, _, attr = spec.rpartition(":")
    if not module or not attr:
        raise ValueError(f"{spec!r} is not of the form 'module:function' or 'file.py:function'")
    return module, attr


def _module_from_file(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"reward file not found: {path}")
    name = "_grpo_reward_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # before exec: pickling and dataclasses look it up
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name]


def load_function(spec: str) -> Callable[..., Any]:
    """Import "package.module:function" or "path/to/file.py:function" (dotted attrs ok)."""
    module_name, attr = split_import_path(spec)
    if module_name.endswith(".py"):
        obj: Any = _module_from_file(Path(module_name).expanduser())
    else:
        obj = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{spec} is not callable")
    return obj


def check_kwargs(fn: Callable, kwargs: dict[str, Any]) -> str | None:
    """Why `fn(x, prompt, **kwargs)` would be a bad call, or None if it binds."""
    try:
        inspect.signature(fn).bind(None, None, **kwargs)
    except TypeError as e:
        return str(e)
    except ValueError:  # no signature (some builtins): cannot check
        return None
    return None


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def as_outcome(value: Any) -> Outcome:
    if not isinstance(value, numbers.Real):
        return f"returned {value!r} (expected a number)"
    score = float(value)
    return score if math.isfinite(score) else f"returned {score} (expected a finite number)"


def _group_outcomes(values: Any, n: int) -> list[Outcome]:
    try:
        values = list(values)
    except TypeError:
        return [f"returned {values!r} (expected a list of {n} numbers)"] * n
    if len(values) != n:
        return [f"returned {len(values)} values for {n} completions"] * n
    return [as_outcome(v) for v in values]


def _call_sync(
    fn: Callable, kind: RewardKind, completions: list[str], prompt: Any, kwargs: dict
) -> list[Outcome]:
    if kind == "group":
        try:
            return _group_outcomes(fn(completions, prompt, **kwargs), len(completions))
        except Exception as e:
            return [describe(e)] * len(completions)
    out: list[Outcome] = []
    for completion in completions:
        try:
            out.append(as_outcome(fn(completion, prompt, **kwargs)))
        except Exception as e:
            out.append(describe(e))
    return out


async def _call_async(
    fn: Callable, kind: RewardKind, completions: list[str], prompt: Any, kwargs: dict
) -> list[Outcome]:
    if kind == "group":
        try:
            return _group_outcomes(await fn(completions, prompt, **kwargs), len(completions))
        except Exception as e:
            return [describe(e)] * len(completions)
    results = await asyncio.gather(
        *(fn(c, prompt, **kwargs) for c in completions), return_exceptions=True
    )
    return [describe(r) if isinstance(r, BaseException) else as_outcome(r) for r in results]


def call_reward(
    fn: Callable, kind: RewardKind, completions: list[str], prompt: Any, kwargs: dict[str, Any]
) -> list[Outcome]:
    """Score a group with one function, blocking (an `async def` runs in its own loop)."""
    if inspect.iscoroutinefunction(fn):
        return asyncio.run(_call_async(fn, kind, completions, prompt, kwargs))
    return _call_sync(fn, kind, completions, prompt, kwargs)
