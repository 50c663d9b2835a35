"""Parsers for vLLM's answers: checked records, or a `ServerResponseError` naming the field.

Pure functions of the decoded JSON (or Prometheus text); the client (`serving/client.py`)
calls them on every answer, so a server that breaks the protocol fails loudly there.

    outs = parse_completions(body, n=8)        # [Completion(token_ids, logprobs, text, ...)]
    scores = parse_classify(body, 4, where)    # one raw logit per input of /classify
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from grpo_stream.serving.errors import ServerResponseError


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str


def field(obj: Any, key: str, where: str, typ: type | tuple[type, ...]) -> Any:
    """`obj[key]`, checked to be present and of type `typ`; else a `ServerResponseError`."""
    if not isinstance(obj, dict) or key not in obj:
        raise ServerResponseError(f"{where}: missing field '{key}'")
    val = obj[key]
    if not isinstance(val, typ):
        raise ServerResponseError(f"{where}.{key}: expected {typ}, got {type(val).__name__}")
    return val


def parse_choice(choice: Any, where: str) -> Completion:
    token_ids = field(choice, "token_ids", where, list)
    lp = field(choice, "logprobs", where, dict)
    logprobs = field(lp, "token_logprobs", f"{where}.logprobs", list)
    if len(logprobs) != len(token_ids):
        raise ServerResponseError(
            f"{where}: {len(token_ids)} token_ids but {len(logprobs)} logprobs.token_logprobs"
        )
    for i, (t, x) in enumerate(zip(token_ids, logprobs, strict=True)):
        if not isinstance(t, int) or isinstance(t, bool):
            raise ServerResponseError(f"{where}.token_ids[{i}]: not an int ({t!r})")
        if not isinstance(x, int | float) or not math.isfinite(x) or x > 1e-4:
            raise ServerResponseError(f"{where}.logprobs.token_logprobs[{i}]: bad value {x!r}")
    text = choice.get("text", "")
    finish = choice.get("finish_reason") or ""
    return Completion(list(token_ids), [float(x) for x in logprobs], str(text), str(finish))


def parse_completions(body: Any, n: int) -> list[Completion]:
    choices = field(body, "choices", "response", list)
    if len(choices) != n:
        raise ServerResponseError(f"response.choices: expected {n} choices, got {len(choices)}")
    ordered = sorted(choices, key=lambda c: c.get("index", 0) if isinstance(c, dict) else 0)
    return [parse_choice(c, f"response.choices[{i}]") for i, c in enumerate(ordered)]


def parse_prometheus(text: str) -> dict[str, float]:
    """Prometheus text reduced to {metric name: value summed over its labels}."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        try:
            out[name] = out.get(name, 0.0) + float(value)
        except ValueError:
            continue
    return out


def parse_classify(body: Any, n: int, where: str) -> list[float]:
    """`data[i].probs[0]` of a /classify answer for `n` inputs, checked: one label, finite."""
    data = field(body, "data", where, list)
    if len(data) != n:
        raise ServerResponseError(f"response.data: expected {n} items, got {len(data)}", where)
    out = []
    for i, item in enumerate(
        sorted(data, key=lambda d: d.get("index", 0) if isinstance(d, dict) else 0)
    ):
        probs = field(item, "probs", f"{where} data[{i}]", list)
        if len(probs) != 1:
            raise ServerResponseError(
                f"data[{i}].probs has {len(probs)} values: the reward model must have "
                "exactly one label (num_labels = 1)",
                where,
            )
        x = probs[0]
        if not isinstance(x, int | float) or not math.isfinite(x):
            raise ServerResponseError(f"data[{i}].probs[0]: bad value {x!r}", where)
        out.append(float(x))
    return out
