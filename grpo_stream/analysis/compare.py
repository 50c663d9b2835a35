"""Runs side by side: load run folders, group them into settings, and measure each.

    runs, settings, threshold = compare_runs(["runs/sweeps/epochs"], None, window=3)

`grpo-stream compare` (`compare_cli.py`) turns these into OUT/compare.md, summary.json
and the PNGs (`compare_table.py`, `compare_plot.py`).

Each run folder gives `metrics.jsonl` (one row per learner step), `config.toml` and, when
held-out evaluation ran, `eval.jsonl`. Runs are grouped into settings by their resolved
config minus the `run` section (so seeds of one setting group together); a setting is
named by the config keys that differ between settings, or, when every run is a sweep's
point (its `sweep_done.json`), by the sweep's own choices minus the seed (a bundle's
name, such as `setting=ppo`, instead of every key it sets). Trained samples are the running
sum of each step's `samples`; wall time the running sum of `step_s` (the learner's time,
waits for batches included, model loading and server start excluded).

Per run and per setting (mean ± std over seeds, and the seed spread max - min) the table
reports: the final reward (trailing mean of the last `--smooth` steps), the trained
samples at the first step whose trailing-mean reward >= the threshold, the last held-out
greedy pass@1 (else mean@k), the clip fraction per epoch index, the approximate
KL(pi_old || pi_theta), the behaviour/proximal mismatch (mean |log pi_old - log pi_b| and
the TIS-truncated fraction), the median time per step and the learner's peak memory. The
conclusion compares the settings' difference with the seeds' spread and says plainly
when the seeds disagree more than the settings differ.
"""

from __future__ import annotations

import json
import math
import statistics
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from grpo_stream.core import jsonl
from grpo_stream.core import metric_names as M
from grpo_stream.core.errors import UserError

SWEEP_DONE_FILE = "sweep_done.json"  # `grpo_stream.analysis.sweep` writes it per point
IGNORED_PREFIXES = ("run.", "server.urls", "server.port")  # never part of a setting


class CompareError(UserError, ValueError):
    """A folder that is not a run folder; the message names it."""


@dataclass
class Run:
    path: Path
    name: str
    config: dict  # flattened resolved config
    rows: list[dict]
    evals: list[dict]
    setting: str = ""
    choice: dict = field(default_factory=dict)  # the sweep's choice, `run.seed` left out
    samples: list[float] = field(default_factory=list)  # cumulative, after each step
    wall: list[float] = field(default_factory=list)  # cumulative learner seconds
    reward: list[float] = field(default_factory=list)
    smooth: list[float] = field(default_factory=list)  # trailing mean
    stats: dict = field(default_factory=dict)

    @property
    def seed(self):
        return self.config.get("run.seed")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def _jsonl(path: Path) -> list[dict]:
    return jsonl.read(path)  # a torn last line of a killed run is left out


def run_dirs(paths: list[str]) -> list[Path]:
    """Run folders, a sweep folder standing for its points (sorted by name)."""
    out = []
    for p in map(Path, paths):
        if (p / "metrics.jsonl").is_file():
            out.append(p)
        elif found := sorted(q.parent for q in p.glob("*/metrics.jsonl")):
            out += found
        else:
            raise CompareError(f"{p}: no metrics.jsonl in it or in its subfolders")
    return out


def trailing_mean(xs: list[float], window: int) -> list[float]:
    return [sum(xs[max(0, i - window + 1) : i + 1]) / len(xs[max(0, i - window + 1) : i + 1])
            for i in range(len(xs))]  # fmt: skip


def _cumsum(xs) -> list[float]:
    out, total = [], 0.0
    for x in xs:
        total += float(x or 0.0)
        out.append(total)
    return out


def load_run(path: Path, window: int) -> Run:
    rows = [r for r in _jsonl(path / "metrics.jsonl") if r.get(M.REWARD_MEAN) is not None]
    if not rows:
        raise CompareError(f"{path}/metrics.jsonl: no learner steps")
    cfg_file = path / "config.toml"
    config = _flatten(tomllib.loads(cfg_file.read_text())) if cfg_file.is_file() else {}
    run = Run(path, path.name, config, rows, _jsonl(path / "eval.jsonl"))
    done = path / SWEEP_DONE_FILE
    if done.is_file():
        choice = json.loads(done.read_text()).get("choice") or {}
        run.choice = {k: v for k, v in choice.items() if k != "run.seed"}
    run.samples = _cumsum(r.get(M.SAMPLES) for r in rows)
    run.wall = _cumsum(r.get(M.STEP_S) for r in rows)
    run.reward = [float(r[M.REWARD_MEAN]) for r in rows]
    run.smooth = trailing_mean(run.reward, window)
    return run


def eval_points(run: Run) -> list[tuple[float, float, float]]:
    """(trained samples, wall s, value) per eval row: greedy pass@1, else mean@k; the
    version v is the weights after v steps (0: the initial model)."""
    out = []
    for e in run.evals:
        value = e.get("greedy_pass_at_1", e.get("mean_at_k"))
        step = e.get("step") if e.get("step") is not None else e.get("policy_version")
        if value is None or step is None or step > len(run.rows):
            continue
        at = int(step) - 1
        out.append((run.samples[at] if at >= 0 else 0.0, run.wall[at] if at >= 0 else 0.0,
                    float(value)))  # fmt: skip
    return out


def _mean_of(rows: list[dict], key: str) -> float | None:
    xs = [float(r[key]) for r in rows if isinstance(r.get(key), int | float)]
    return sum(xs) / len(xs) if xs else None


def epoch_keys(rows: list[dict]) -> list[int]:
    found = {int(k.rsplit(M.EPOCH_SEP, 1)[1]) for r in rows for k in r
             if k.startswith(M.CLIP_FRAC + M.EPOCH_SEP)}  # fmt: skip
    return sorted(found)


def samples_to(run: Run, threshold: float) -> float | None:
    """Trained samples at the first step whose trailing-mean reward >= threshold."""
    for s, r in zip(run.samples, run.smooth, strict=True):
        if r >= threshold:
            return s
    return None


def run_stats(run: Run, threshold: float) -> dict:
    from grpo_stream.analysis.compare_models import read_costs

    rows = run.rows
    evals = eval_points(run)
    peak = [float(r[M.PEAK_MEMORY_MB]) for r in rows if r.get(M.PEAK_MEMORY_MB) is not None]
    step_s = [float(r[M.STEP_S]) for r in rows if r.get(M.STEP_S) is not None]
    return {
        "steps": len(rows),
        "samples": run.samples[-1],
        "wall_s": run.wall[-1],
        "final_reward": run.smooth[-1],
        "samples_to_threshold": samples_to(run, threshold),
        "eval": evals[-1][2] if evals else None,
        "clip_epoch": {e: _mean_of(rows, M.clip_frac_epoch(e)) for e in epoch_keys(rows)},
        "approx_kl": _mean_of(rows, M.APPROX_KL_PROXIMAL),
        "logprob_abs_diff": _mean_of(rows, M.BEHAVIOUR_LOGPROB_ABS_DIFF),
        "tis_truncated": _mean_of(rows, M.TIS_TRUNCATED_FRAC),
        "s_per_step": statistics.median(step_s) if step_s else None,
        "peak_mb": max(peak) if peak else None,
        **read_costs(run.path),  # the models held, their sizes, the reward servers' memory
    }


def _short(v) -> str:
    if isinstance(v, list) and v and all(isinstance(x, dict) and "name" in x for x in v):
        return "+".join(str(x["name"]) for x in v)
    text = json.dumps(v) if isinstance(v, list | dict) else str(v)
    return text if len(text) <= 40 else text[:37] + "..."


def name_settings(runs: list[Run]) -> None:
    """Each run's setting: the config keys (minus `run.*`) that differ across runs."""

    def key(run: Run) -> dict:
        return {k: v for k, v in run.config.items() if not k.startswith(IGNORED_PREFIXES)}

    if all(r.choice for r in runs):  # sweep points: the sweep's names for its choices
        for r in runs:
            r.setting = ",".join(f"{k.rsplit('.', 1)[-1]}={_short(v)}" for k, v in r.choice.items())
        return
    keys = sorted({k for r in runs for k in key(r)})
    differ = [k for k in keys if len({json.dumps(key(r).get(k), sort_keys=True) for r in runs}) > 1]
    for r in runs:
        parts = [f"{k.rsplit('.', 1)[-1]}={_short(r.config.get(k))}" for k in differ]
        r.setting = ",".join(parts) or "all"


def auto_threshold(runs: list[Run]) -> float:
    """Halfway from the lowest first to the highest last trailing-mean reward."""
    lo = min(r.smooth[0] for r in runs)
    hi = max(r.smooth[-1] for r in runs)
    return round(lo + (hi - lo) / 2, 3)


@dataclass
class Setting:
    name: str
    runs: list[Run]

    def values(self, key: str) -> list[float]:
        return [r.stats[key] for r in self.runs if r.stats.get(key) is not None]

    def summary(self, key: str) -> dict | None:
        xs = self.values(key)
        if not xs:
            return None
        std = statistics.stdev(xs) if len(xs) > 1 else None
        return {"mean": sum(xs) / len(xs), "std": std, "spread": max(xs) - min(xs),
                "n": len(xs), "of": len(self.runs)}  # fmt: skip


def group(runs: list[Run]) -> list[Setting]:
    out: dict[str, Setting] = {}
    for r in runs:
        out.setdefault(r.setting, Setting(r.setting, [])).runs.append(r)
    return list(out.values())


def compare_runs(paths: list[str], threshold: float | None = None, window: int = 3):
    """(runs, settings, threshold) with every run's stats computed."""
    runs = [load_run(p, window) for p in run_dirs(paths)]
    name_settings(runs)
    thr = auto_threshold(runs) if threshold is None else threshold
    for r in runs:
        r.stats = run_stats(r, thr)
    return runs, group(runs), thr


def fmt(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, float) and abs(v) >= 100:
        return f"{v:.0f}"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)
