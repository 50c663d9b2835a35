"""SIMULATION: async against synchronous GRPO at scale (1..64 servers, staleness 0..8).

    python -m bench.simulate [--quick] [--fit RUN/buffer] [--steps N]
    python -m bench.simulate --pause-modes [--quick]   # wait / keep / abort side by side

Not a measurement of real hardware. What is REAL here (imported and driven, not
re-implemented): the generator (`grpo_stream.generator.loop.Generator`: its producer,
`max_in_flight`, the staleness gate `generator/gate.py`, least-loaded `ServerPool`,
`request_group`, the reward runner, the buffer writer task), the buffer (an Arrow store
in a temporary folder), the learner's batch source (`learner/source.py: BatchSource`
over a `GroupCursor`: batch size, stale-group drops at `learner.max_staleness`), the
version rule (`learner/step.py: version_after`), the progress file the gate reads
(`grpo_stream.core.progress`), and `--sync` (`grpo_stream.config.sync_mode.apply_sync_mode`).

What is SIMULATED: (1) the vLLM servers, an in-process stand-in for the client the
generator uses (`bench/sim_servers.py: SimServers`): each server runs `slots` requests at
once (continuous batching), a request of G samples takes `prefill_s + tpot_s *
max(lengths)`, lengths drawn from a lognormal (fitted to a real run's buffer with
`--fit`, else the defaults there: a long tail), paused during a sync as vLLM pauses in
the run's `sync.pause_mode` (wait, keep, abort; sim_servers.py says what each does); (2) the learner's compute: the learner loop
cannot run without torch models, so its `train_step` is replaced by a sleep of
`train_s_per_token` per trained token and its weight push by a pause of `sync_s` on
every server. Times are simulated seconds run `scale` times faster in real time (real
sleeps), so a sweep takes minutes; the bookkeeping of the real parts costs real time
too, which makes the simulation slightly pessimistic at high throughput.

Prints (labelled SIMULATION) the throughput of sync and async at each point, the speedup,
the staleness actually seen, and where more servers stop helping; writes
`bench/results/simulate.json` (the figure format of DESIGN.md) and appends the table to
`bench/RESULTS.md`; then compares the three pause modes at one point
(`bench/sim_pause.py`, `bench/results/partial_rollouts.json`), or only that with
`--pause-modes`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench.sim_servers import TOKEN_BASE, SimParams, SimServers
from bench.simulate_report import report
from grpo_stream.config import Config


@dataclass
class Outcome:
    steps: int = 0
    samples: int = 0
    tokens: int = 0
    groups_generated: int = 0
    stale_dropped: int = 0
    staleness: list[int] = field(default_factory=list)
    train_s: float = 0.0  # simulated
    wall_s: float = 0.0  # simulated: from the start to the learner's last step
    t_end: float = 0.0  # real monotonic time of the learner's last step
    gated_s: float = 0.0  # simulated
    buffer_versions: list[int] = field(default_factory=list)
    sync_wait_s: float = 0.0  # simulated: the learner waiting on weight syncs
    completion_tokens: int = 0
    mixed_tokens: int = 0  # sampled under an older version than their group's last one
    aborted_samples: int = 0  # cut by a pause in abort mode (finish_reason "abort")
    spanning_samples: int = 0  # policy_version != policy_version_end (what a run sees)


def count_mixed(out: Outcome, groups: list) -> None:
    """Add the trained groups' partial-rollout counts (token ids carry the version that
    sampled them: bench/sim_servers.py) to `out`."""
    for g in groups:
        last = max((t - TOKEN_BASE for s in g for t in s.completion_ids), default=0)
        for s in g:
            out.completion_tokens += len(s.completion_ids)
            out.mixed_tokens += sum(1 for t in s.completion_ids if t - TOKEN_BASE < last)
            out.aborted_samples += s.finish_reason == "abort"
            out.spanning_samples += s.policy_version != s.policy_version_end


def sim_learner(cfg: Config, servers: SimServers, out: Outcome, errors: list) -> None:
    """The learner loop's batch/cursor/staleness logic; compute and push are sleeps."""
    from grpo_stream.buffer.cursor import GroupCursor
    from grpo_stream.buffer.store import open_reader
    from grpo_stream.core import run_records
    from grpo_stream.core.progress import LearnerProgress, write_progress
    from grpo_stream.learner.source import BatchSource
    from grpo_stream.learner.step import version_after

    try:
        path, p = cfg.buffer_path(cfg.run.run_dir), servers.p
        while not os.path.exists(os.path.join(path, "meta.json")):
            time.sleep(cfg.buffer.poll_s)
        source = BatchSource(GroupCursor(open_reader(path), poll_s=cfg.buffer.poll_s), cfg.learner)
        version = step = 0
        source.lineage = lineage = run_records.new_lineage(cfg.run.run_dir)  # as the learner does

        def publish(finished: bool = False) -> None:  # RunRecords.progress
            write_progress(path, LearnerProgress(source.position, version, step,
                                                 finished=finished, lineage=lineage))  # fmt: skip

        publish()
        while step < cfg.learner.max_steps:
            batch = source.next(version)
            out.stale_dropped += batch.info["stale_groups_dropped"]
            if batch.groups:
                samples = [s for g in batch.groups for s in g]
                tokens = sum(len(s.prompt_ids) + len(s.completion_ids) for s in samples)
                out.staleness += [version - s.policy_version for s in samples]
                out.samples, out.tokens = out.samples + len(samples), out.tokens + tokens
                count_mixed(out, batch.groups)
                time.sleep(tokens * p.train_s_per_token * p.scale)  # the train_step
                out.train_s += tokens * p.train_s_per_token
                step += 1
                version = version_after(step, cfg)
                if step % cfg.sync.every == 0:
                    out.sync_wait_s += servers.sync(version)
            publish()
        out.steps, out.t_end = step, time.monotonic()  # in-flight requests after it don't count
        publish(finished=True)
    except BaseException as e:  # noqa: BLE001 - reported by the caller
        errors.append(e)


def point_config(run_dir: str, servers: int, staleness: int | None, steps: int,
                 p: SimParams, batch_groups: int, group_size: int) -> Config:  # fmt: skip
    """The run config of one point; staleness None: `--sync`."""
    from grpo_stream.config.sync_mode import apply_sync_mode

    cfg = Config()
    cfg.run.run_dir = run_dir
    cfg.server.urls = [f"http://sim-{i}:8000" for i in range(servers)]
    cfg.generator.group_size, cfg.generator.max_tokens = group_size, p.max_tokens
    cfg.generator.max_in_flight = servers * p.slots
    cfg.learner.batch_groups, cfg.learner.max_steps = batch_groups, steps
    cfg.buffer.poll_s = 0.002
    cfg.task.use_chat_template = False
    if staleness is None:
        return apply_sync_mode(cfg)
    cfg.generator.max_ahead_batches = cfg.learner.max_staleness = staleness
    return cfg


def simulate_point(cfg: Config, p: SimParams, model_dir: str, seed: int = 0) -> Outcome:
    """One simulated run: the real generator against `SimServers`, the learner thread."""
    import asyncio

    import grpo_stream.generator.loop as gen_loop

    servers = SimServers(cfg.server.urls, p, seed, cfg.sync.pause_mode)
    out, errors = Outcome(), []
    old_client = gen_loop.VLLMClient
    gen_loop.VLLMClient = servers  # the generator's only way to the servers
    try:
        gen = gen_loop.Generator(cfg, cfg.run.run_dir, model_dir)
        learner = threading.Thread(target=sim_learner, args=(cfg, servers, out, errors))
        t0 = time.monotonic()
        learner.start()
        with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):
            out.groups_generated = asyncio.run(gen.run())
        learner.join()
        out.wall_s = (out.t_end - t0) / p.scale
        out.gated_s = gen.clocks.gated.seconds() / p.scale
    finally:
        gen_loop.VLLMClient = old_client
    if errors:
        raise errors[0]
    from grpo_stream.buffer.store import open_reader

    r = open_reader(cfg.buffer_path(cfg.run.run_dir))
    out.buffer_versions = [g[0].policy_version for g in r.read_groups(0, r.num_groups())]
    return out


def fit_lengths(buffer: str) -> tuple[float, float]:
    """(mu, sigma) of a lognormal fitted to a real run's completion lengths."""
    from grpo_stream.buffer.store import open_reader

    r = open_reader(buffer)
    lengths = [len(s.completion_ids) for g in r.read_groups(0, r.num_groups()) for s in g]
    logs = np.log(np.maximum(np.array(lengths, dtype=float), 1.0))
    return float(logs.mean()), float(logs.std())


def sweep(p: SimParams, servers: list[int], stalenesses: list[int], steps: int,
          batch_groups: int, group_size: int, model_dir: str) -> list[dict]:  # fmt: skip
    """One row per (servers, staleness); staleness None rows are the sync baselines."""
    rows = []
    for n in servers:
        for k in [None, *stalenesses]:
            with tempfile.TemporaryDirectory(prefix="grpo-sim-") as d:
                cfg = point_config(d, n, k, steps, p, batch_groups, group_size)
                o = simulate_point(cfg, p, model_dir)
            row = {"servers": n, "staleness": "sync" if k is None else k}
            row |= {f: getattr(o, f) for f in ("steps", "samples", "tokens", "stale_dropped")}
            row |= {"groups_generated": o.groups_generated, "wall_s": o.wall_s,
                    "samples_per_s": o.samples / o.wall_s, "train_s": o.train_s,
                    "learner_busy": o.train_s / o.wall_s, "gated_s": o.gated_s,
                    "staleness_mean": float(np.mean(o.staleness)) if o.staleness else 0.0,
                    "staleness_max": max(o.staleness, default=0)}  # fmt: skip
            rows.append(row)
            print(f"SIMULATION servers={n:3d} staleness={row['staleness']!s:>4}: "
                  f"{row['samples_per_s']:7.2f} samples/s, learner busy "
                  f"{row['learner_busy']:.0%}, staleness seen {row['staleness_mean']:.2f} "
                  f"(max {row['staleness_max']})", flush=True)  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="few points and steps (a smoke run)")
    ap.add_argument("--fit", default=None, help="a real run's buffer: fit the length law to it")
    ap.add_argument("--steps", type=int, default=None, help="learner steps per point")
    ap.add_argument("--scale", type=float, default=None, help="real s per simulated s")
    ap.add_argument("--out", default="bench/results/simulate.json")
    ap.add_argument("--pause-out", default="bench/results/partial_rollouts.json")
    ap.add_argument("--results-md", default="bench/RESULTS.md")
    ap.add_argument(
        "--pause-modes",
        action="store_true",
        help="only the sync.pause_mode comparison (run after the sweep otherwise)",
    )
    ap.add_argument("--rows", default=None,
                    help="re-report the rows of an earlier simulate.json (no simulation)")  # fmt: skip
    args = ap.parse_args(argv)
    p = SimParams()
    if args.scale:
        p.scale = args.scale
    if args.fit:
        p.len_mu, p.len_sigma = fit_lengths(args.fit)
    if args.rows:
        config = json.loads(Path(args.rows).read_text())["config"]
        rows = config.pop("rows")
        config.pop("saturation", None)
        report(rows, config, Path(args.out), Path(args.results_md))
        return 0
    servers = [1, 4, 16] if args.quick else [1, 2, 4, 8, 16, 32, 64]
    stal = [0, 4] if args.quick else [0, 1, 2, 4, 8]
    steps = args.steps or (4 if args.quick else 8)
    from grpo_stream.config import ModelConfig
    from grpo_stream.serving.model import resolve_model_path

    model_dir = str(resolve_model_path(ModelConfig()))  # its tokenizer renders the prompts
    print(f"SIMULATION (not real hardware): {dataclasses.asdict(p)}", flush=True)
    if not args.pause_modes:  # the sweep, then the pause modes (make bench runs both)
        rows = sweep(p, servers, stal, steps, 16, 8, model_dir)
        config = {"params": dataclasses.asdict(p), "fitted_from": args.fit, "steps": steps,
                  "batch_groups": 16, "group_size": 8, "servers": servers, "staleness": stal}  # fmt: skip
        report(rows, config, Path(args.out), Path(args.results_md))
    from bench import sim_pause

    sim_pause.run(p, args.quick, args.steps, model_dir, Path(args.pause_out), Path(args.results_md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
