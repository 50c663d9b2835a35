"""Each process's utilisation and idle ratio, from a run folder's time records.

Reads `RUN/metrics.jsonl` (the learner's step phases, `grpo_stream.core.timing.STEP_PHASES`,
and each sync's `sync_pauses`) and the last row of `RUN/generator_metrics.jsonl` (the
generator's clocks). verl's `trainer/idle_ratio` and `rollouter/idle_ratio` are the
learner's and generator's `idle_ratio` here:

- learner: utilisation = (proximal_s + train_s) / wall; idle_ratio = wait_s / wall (the
  learner had no batch); wall = the sum of step_s;
- generator: idle_ratio = the share of its life with no request in flight (gated by
  staleness, or nothing to do); it also reports gated time, reward time and the mean
  requests in flight;
- each server: busy = at least one of the generator's requests in flight on it (a
  request frozen through a `pause_mode = "keep"` sync counts as busy), paused = its sync
  pauses, idle = the rest of the generator's life; utilisation = busy / life.

    for line in summary_lines(run_dir): print(line)   # run's end-of-run summary
"""

from __future__ import annotations

import os

from grpo_stream.core import jsonl
from grpo_stream.core import metric_names as M
from grpo_stream.core.timing import STEP_PHASES


def _rows(path: str) -> list[dict]:
    return jsonl.read(path)  # a torn last line (a writer mid-write) is left out


def learner_times(rows: list[dict]) -> dict:
    """Seconds per phase over the run, the wall (sum of step_s), utilisation, idle ratio."""
    out = {k: sum(float(r.get(k) or 0.0) for r in rows) for k in STEP_PHASES}
    wall = sum(float(r.get(M.STEP_S) or 0.0) for r in rows)
    out["wall_s"] = wall
    out["utilisation"] = (out[M.PROXIMAL_S] + out[M.TRAIN_S]) / wall if wall else 0.0
    out["idle_ratio"] = out[M.WAIT_S] / wall if wall else 0.0
    return out


def pause_intervals(rows: list[dict]) -> dict[str, list[tuple[float, float]]]:
    """Each server's (paused_at, resumed_at) over the run, from the sync rows."""
    out: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        for url, t0, t1 in r.get(M.SYNC_PAUSES) or []:
            out.setdefault(url, []).append((float(t0), float(t1)))
    return out


def _clip(intervals: list[tuple[float, float]], lo: float, hi: float) -> float:
    return sum(max(0.0, min(b, hi) - max(a, lo)) for a, b in intervals)


def generator_times(gen: dict, pauses: dict[str, list[tuple[float, float]]]) -> dict:
    """The generator's and each server's shares of the generator's life."""
    life = float(gen.get("elapsed_s") or 0.0)
    start = float(gen.get("wall_start") or 0.0)
    out = {
        "wall_s": life,
        "gated_s": float(gen.get("gated_s") or 0.0),
        "reward_s": float(gen.get("reward_s") or 0.0),
        "in_flight_mean": float(gen.get("in_flight_mean") or 0.0),
        "idle_ratio": float(gen.get("no_request_s") or 0.0) / life if life else 0.0,
        "servers": {},
    }
    for url, busy in (gen.get("server_busy_s") or {}).items():
        paused = _clip(pauses.get(url.rstrip("/"), pauses.get(url, [])), start, start + life)
        idle = max(0.0, life - busy - paused)
        out["servers"][url] = {
            "busy_s": busy,
            "paused_s": paused,
            "idle_s": idle,
            "utilisation": busy / life if life else 0.0,
            "idle_ratio": idle / life if life else 0.0,
        }
    return out


def run_times(run_dir: str) -> dict:
    """{"learner": learner_times, "generator": generator_times} of a run folder ({} parts
    for a record that is missing)."""
    rows = _rows(os.path.join(run_dir, "metrics.jsonl"))
    gens = _rows(os.path.join(run_dir, "generator_metrics.jsonl"))
    out: dict = {}
    if rows:
        out["learner"] = learner_times(rows)
    if gens and "elapsed_s" in gens[-1]:
        out["generator"] = generator_times(gens[-1], pause_intervals(rows))
    return out


def summary_lines(run_dir: str) -> list[str]:
    """The end-of-run lines: one per process (learner, generator, each server)."""
    t = run_times(run_dir)
    lines = []
    if lrn := t.get("learner"):
        wall = lrn["wall_s"] or 1e-9
        parts = " ".join(f"{k.removesuffix('_s')} {lrn[k] / wall:.0%}" for k in STEP_PHASES)
        lines.append(f"learner: utilisation {lrn['utilisation']:.0%}, idle_ratio "
                     f"{lrn['idle_ratio']:.2f} over {lrn['wall_s']:.1f}s ({parts})")  # fmt: skip
    if gen := t.get("generator"):
        lines.append(f"generator: idle_ratio {gen['idle_ratio']:.2f} over {gen['wall_s']:.1f}s, "
                     f"gated {gen['gated_s']:.1f}s, reward {gen['reward_s']:.1f}s, "
                     f"{gen['in_flight_mean']:.1f} requests in flight on average")  # fmt: skip
        for url, s in gen["servers"].items():
            lines.append(f"server {url}: utilisation {s['utilisation']:.0%} (busy "
                         f"{s['busy_s']:.1f}s, paused {s['paused_s']:.1f}s, idle "
                         f"{s['idle_s']:.1f}s), idle_ratio {s['idle_ratio']:.2f}")  # fmt: skip
    return lines
