"""The eval record: one `EvalRow` per evaluated policy version, RUN/eval.jsonl, the table.

    log = EvalLog(run_dir)            # appends RUN/eval.jsonl, mirrors to TensorBoard RUN/tb
    log.write(row)
    rows = read_eval_rows(run_dir)
    print(format_table(rows))

Metric keys (`EVAL_METRICS`) are defined here once and used by the JSONL, TensorBoard
(as `eval/KEY`, step = policy version), the table and the plot.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from grpo_stream.core import jsonl

EVAL_FILE = "eval.jsonl"


@dataclass
class Scored:
    """One eval completion (or episode, `eval.episodes`), scored; `evaluate.summarize`
    makes an `EvalRow` of them."""

    correct: bool
    reward: float  # NaN when a reward function failed
    components: dict[str, float]
    tokens: int
    truncated: bool
    turns: int | None = None  # an episode's model turns (None: a single-turn completion)
    tool_calls: int | None = None


@dataclass
class EvalRow:
    policy_version: int  # the servers' /weight_info during every eval request
    version_mismatch: bool  # a request saw another version before or after it (marked)
    versions_seen: list[int]
    prompts: int  # held-out prompts scored (failed requests excluded)
    k: int
    greedy_pass_at_1: float | None  # greedy (temperature 0) completion correct
    mean_at_k: float | None  # mean fraction of the k samples correct
    pass_at_k: float | None  # unbiased estimator of Chen et al. 2021, n = k
    reward_mean: float | None  # over the k samples (greedy when k = 0), failed ones left out
    reward_components: dict[str, float]
    greedy_reward_mean: float | None
    length_mean: float | None  # completion tokens, same completions as reward_mean
    truncated_frac: float | None  # finish_reason "length"
    reward_failed: int  # completions whose reward failed (counted as not correct)
    failed_prompts: int  # prompts whose requests failed for good
    eval_s: float  # wall time of this evaluation
    time: float  # unix time when it ended
    step: int | None = None  # the learner step that produced the version, when known
    model: str = ""  # standalone `grpo-stream eval`: the model evaluated
    turns_mean: float | None = None  # episodes ([env]): model turns, same ones as reward_mean
    tool_calls_mean: float | None = None  # episodes: environment turns with a tool's result
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {k: _clean(v) for k, v in asdict(self).items()}


# key in the JSON row -> label in the table and in TensorBoard
EVAL_METRICS: dict[str, str] = {
    "greedy_pass_at_1": "pass@1 (greedy)",
    "mean_at_k": "mean@k",
    "pass_at_k": "pass@k",
    "reward_mean": "reward",
    "length_mean": "length",
    "truncated_frac": "truncated",
    "eval_s": "eval s",
}


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    return v


class EvalLog:
    """Appends rows to RUN/eval.jsonl (fsynced) and to TensorBoard under RUN/tb."""

    def __init__(self, run_dir: str, tensorboard: bool = True):
        self.path = os.path.join(run_dir, EVAL_FILE)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(os.path.join(run_dir, "tb"), filename_suffix=".eval")
            except Exception:  # tensorboard missing or broken: the JSONL is the record
                self._tb = None

    def write(self, row: EvalRow) -> None:
        jsonl.append(self.path, row.to_json())
        if self._tb is not None:
            for key in EVAL_METRICS:
                value = getattr(row, key)
                if isinstance(value, int | float) and math.isfinite(value):
                    self._tb.add_scalar(f"eval/{key}", value, row.policy_version)
            for key, value in row.reward_components.items():
                if math.isfinite(value):
                    self._tb.add_scalar(f"eval/reward/{key}", value, row.policy_version)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_eval_rows(run_dir: str) -> list[dict[str, Any]]:
    """The rows of RUN/eval.jsonl ([] when there is none); a torn last line is left out."""
    return jsonl.read(os.path.join(run_dir, EVAL_FILE))


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def format_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width table, one line per row: model or version, then the metrics."""
    head = ["model" if any(r.get("model") for r in rows) else "version", "prompts", "k"]
    head += list(EVAL_METRICS.values())
    lines = [head]
    for r in rows:
        first = r.get("model") or str(r["policy_version"])
        if r.get("version_mismatch"):
            first += " (mixed)"
        lines.append(
            [first, str(r["prompts"]), str(r["k"])] + [_fmt(r.get(k)) for k in EVAL_METRICS]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join(
        "  ".join(
            cell.rjust(w) if i else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in lines
    )


def summary_line(rows: list[dict[str, Any]]) -> str | None:
    """'held-out pass@1 (greedy) on 32 prompts: 0.250 at v0 -> 0.531 at v12 (...)', or None."""
    greedy = any(r.get("greedy_pass_at_1") is not None for r in rows)
    key = "greedy_pass_at_1" if greedy else "mean_at_k"
    scored = [r for r in rows if r.get(key) is not None]
    if not scored:
        return None
    first, last = scored[0], scored[-1]
    label = "pass@1 (greedy)" if greedy else f"mean@{first['k']}"
    total_s = sum(r.get("eval_s") or 0.0 for r in rows)
    return (
        f"held-out {label} on {first['prompts']} prompts: {first[key]:.3f} at "
        f"v{first['policy_version']} -> {last[key]:.3f} at v{last['policy_version']} "
        f"({len(rows)} evals, {total_s:.0f} s)"
    )


def run_summary(run_dir: str, metrics_rows: list[dict[str, Any]]) -> str | None:
    """The eval line `grpo-stream run` prints at the end, with how much evaluation ran:
    its busy time as a share of the span from the first evaluation's start to the last's
    end, and the learner's waits before syncs (`eval_wait_s` in metrics.jsonl). Busy time
    overlaps training, so it is not the cost in wall time: that is what the same run with
    `eval.every=0` saves, measured by a pair of runs (README)."""
    from grpo_stream.core.metric_names import EVAL_WAIT_S

    rows = read_eval_rows(run_dir)
    line = summary_line(rows)
    if line is None:
        return None
    waited = sum(r.get(EVAL_WAIT_S) or 0.0 for r in metrics_rows)
    busy = sum(r.get("eval_s") or 0.0 for r in rows)
    span = rows[-1]["time"] - (rows[0]["time"] - (rows[0].get("eval_s") or 0.0))
    share = f", busy {100 * busy / span:.0f}% of the {span:.0f} s they spanned" if span > 0 else ""
    return f"{line[:-1]}{share}); the learner waited {waited:.0f} s for it"  # inside (...)
