"""SIMULATION: the three `sync.pause_mode`s side by side on the long-tailed default lengths.

    python -m bench.simulate --pause-modes [--quick]

One point (servers, staleness) run per mode (wait, keep, abort) and seed through
`bench.simulate.simulate_point` (the real generator, gate, buffer and batch source
against `bench/sim_servers.py`, whose pauses follow vLLM 0.32's semantics). Per mode:
the learner's simulated time waiting on syncs, trained samples/s, the staleness seen,
the share of trained completion tokens sampled under an older version than their
group's last one (partial rollouts: mixed policy, corrected by the behaviour log-probs),
the share of trained samples cut by an abort, and the share whose version bracket
(`policy_version != policy_version_end`) spans a sync, which is what a real run records.
The figures are the means over the seeds. Writes `bench/results/partial_rollouts.json`
and appends the table to `bench/RESULTS.md`.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

from bench.figures import append_results_md, figure, write_result
from bench.sim_servers import PAUSE_MODES, SimParams

# keep over wait: a default that brings mixed-policy tokens must win clearly, a quarter
# more samples/s, beyond the noise of a 3-seed mean (one wait-mode run's throughput moves
# by tens of percent: a few requests of thousands of tokens decide its syncs)
GOAL_KEEP_VS_WAIT = 1.25
GOAL_SYNC_WAIT_RATIO = 0.5  # keep removes the drain: its sync wait is about `sync_s`
GOAL_MIXED_SHARE = 0.10  # the behaviour correction then acts on a minority of tokens
GOAL_ABORT_CUT_SHARE = 0.01  # a cut sample is scored as a wrong answer: near none


def pause_row(mode: str, o) -> dict:
    """The figures of one mode's `Outcome`."""
    share = lambda a, b: a / b if b else 0.0  # noqa: E731
    return {"pause_mode": mode, "steps": o.steps, "samples": o.samples, "wall_s": o.wall_s,
            "samples_per_s": share(o.samples, o.wall_s), "sync_wait_s": o.sync_wait_s,
            "whole_samples_per_s": share(o.samples - o.aborted_samples, o.wall_s),
            "sync_wait_share": share(o.sync_wait_s, o.wall_s),
            "learner_busy": share(o.train_s, o.wall_s),
            "staleness_mean": share(sum(o.staleness), len(o.staleness)),
            "staleness_max": max(o.staleness, default=0), "stale_dropped": o.stale_dropped,
            "mixed_token_share": share(o.mixed_tokens, o.completion_tokens),
            "abort_cut_share": share(o.aborted_samples, o.samples),
            "spanning_share": share(o.spanning_samples, o.samples)}  # fmt: skip


def compare(p: SimParams, servers: int, staleness: int, steps: int, batch_groups: int,
            group_size: int, model_dir: str, seeds: list[int]) -> list[dict]:  # fmt: skip
    """One row per (seed, pause mode) at the same point: the long tail makes one run's
    throughput noisy (a few requests of thousands of tokens decide a wait-mode sync)."""
    from bench.simulate import point_config, simulate_point

    rows = []
    for seed in seeds:
        for mode in PAUSE_MODES:
            with tempfile.TemporaryDirectory(prefix="grpo-sim-pause-") as d:
                cfg = point_config(d, servers, staleness, steps, p, batch_groups, group_size)
                cfg.sync.pause_mode = mode
                row = {"seed": seed, **pause_row(mode, simulate_point(cfg, p, model_dir, seed))}
            rows.append(row)
            print(f"SIMULATION seed {seed} pause_mode={mode:5s}: {row['samples_per_s']:6.2f} "
                  f"samples/s, sync wait {row['sync_wait_share']:.0%} of the learner's time, "
                  f"mixed tokens {row['mixed_token_share']:.1%}, cut samples "
                  f"{row['abort_cut_share']:.1%}", flush=True)  # fmt: skip
    return rows


def summary(rows: list[dict]) -> list[dict]:
    """Per pause mode: the mean over seeds of each figure, and samples/s's range."""
    out = []
    for mode in PAUSE_MODES:
        rs = [r for r in rows if r["pause_mode"] == mode]
        keys = [k for k, v in rs[0].items() if isinstance(v, int | float) and k != "seed"]
        mean = {k: sum(r[k] for r in rs) / len(rs) for k in keys}
        sps = [r["samples_per_s"] for r in rs]
        out.append({"pause_mode": mode, "seeds": len(rs), **mean,
                    "samples_per_s_min": min(sps), "samples_per_s_max": max(sps)})  # fmt: skip
    return out


def table(rows: list[dict]) -> list[str]:
    lines = ["| pause_mode | samples/s (sim; seeds' range) | uncut samples/s | learner waiting on syncs | learner busy | "
             "staleness mean / max | mixed-policy tokens | cut by abort | bracket spans "
             "a sync |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['pause_mode']} | {r['samples_per_s']:.2f} "
                     f"({r['samples_per_s_min']:.2f}-{r['samples_per_s_max']:.2f}) | "
                     f"{r['whole_samples_per_s']:.2f} | "
                     f"{r['sync_wait_s']:.0f} s ({r['sync_wait_share']:.0%}) | "
                     f"{r['learner_busy']:.0%} | {r['staleness_mean']:.2f} / "
                     f"{r['staleness_max']:.1f} | {r['mixed_token_share']:.1%} | "
                     f"{r['abort_cut_share']:.1%} | {r['spanning_share']:.1%} |")  # fmt: skip
    return lines


def figures(rows: list[dict]) -> list[dict]:
    by = {r["pause_mode"]: r for r in rows}
    wait, keep, abort = by["wait"], by["keep"], by["abort"]
    ratio = keep["sync_wait_s"] / wait["sync_wait_s"] if wait["sync_wait_s"] else 0.0
    return [
        figure(
            "sim_keep_vs_wait_throughput",
            keep["samples_per_s"] / wait["samples_per_s"],
            "x",
            ">=",
            GOAL_KEEP_VS_WAIT,
        ),  # fmt: skip
        figure("sim_keep_vs_wait_sync_wait_ratio", ratio, "x", "<=", GOAL_SYNC_WAIT_RATIO),
        figure(
            "sim_keep_mixed_token_share",
            keep["mixed_token_share"],
            "fraction",
            "<=",
            GOAL_MIXED_SHARE,
        ),  # fmt: skip
        figure(
            "sim_abort_cut_sample_share",
            abort["abort_cut_share"],
            "fraction",
            "<=",
            GOAL_ABORT_CUT_SHARE,
        ),  # fmt: skip
    ]


def report(rows: list[dict], config: dict, out: Path, md: Path) -> dict:
    """Figures and table from the per-mode means; every seed's row kept in the file."""
    means = summary(rows)
    result = write_result(out, figures(means), {**config, "summary": means, "rows": rows})
    title = "SIMULATION: sync.pause_mode wait / keep / abort (bench/simulate.py --pause-modes)"
    append_results_md(md, title, table(means), result)
    for f in result["figures"]:
        print(f"SIMULATION {f['name']}: {f['value']} {f['unit']} (goal {f['op']} "
              f"{f['goal']}: {'ok' if f['ok'] else 'NOT MET'})")  # fmt: skip
    return result


def run(p: SimParams, quick: bool, steps: int | None, model_dir: str, out: Path,
        md: Path) -> dict:  # fmt: skip
    """4 servers at staleness 1, batches of 16 groups of 8; 3 seeds (`quick`: 1)."""
    servers, staleness, steps = 4, 1, steps or (4 if quick else 12)
    seeds = [0] if quick else [0, 1, 2]
    rows = compare(p, servers, staleness, steps, 16, 8, model_dir, seeds)
    config = {"params": dataclasses.asdict(p), "servers": servers, "staleness": staleness,
              "steps": steps, "batch_groups": 16, "group_size": 8, "sync_mode": "all",
              "seeds": seeds}  # fmt: skip
    return report(rows, config, out, md)
