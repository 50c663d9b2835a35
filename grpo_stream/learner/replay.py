"""`grpo-stream replay`: re-run learner steps on stored rollouts, without a vLLM server.

    grpo-stream replay RUN_DIR [--checkpoint step-N|latest|PATH] [--steps K] [--out DIR]
                       [--seed S] [--check-logprobs] [--no-train] [section.key=value ...]

Loads `RUN_DIR/config.toml` (plus overrides), starts from a checkpoint (its model,
optimizer, scheduler and RNG state) or, without one, from the run's initial model, and
replays the steps that come after it exactly as `RUN_DIR/trained_batches.jsonl`
recorded them: the same groups (by id, from the recorded cursor range of the buffer) in
the same order, through the learner's own `train_step`, set up by the learner's own
functions (threads, seeds). So a replayed row equals the learner's row for that step,
key for key, except the wall-clock keys in `TIMING_KEYS` (and the weight-sync timings,
which only the learner has). `--seed S` re-seeds Python, NumPy and torch after loading
(default: the learner's own seeding, `run.seed`, or the checkpoint's RNG state); on a
GPU the replay turns on deterministic kernels, which the learner does not.

`--check-logprobs` first reports the log-prob drift of the replayed steps' stored
completions under the starting weights (see `learner/drift.py`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from grpo_stream.config import Config, ConfigError, load_run_config
from grpo_stream.core import jsonl
from grpo_stream.core import metric_names as M
from grpo_stream.core.errors import UserError

TIMING_KEYS = M.WALL_CLOCK


class ReplayError(ConfigError):
    """A run folder, checkpoint or buffer that cannot be replayed; the message names it."""


@dataclass
class Start:
    """Where a replay starts: weights, the learner step and policy version they hold."""

    model_dir: str
    step: int
    version: int | None
    checkpoint: Path | None  # a learner checkpoint folder (optimizer state), or None
    label: str


# ---------------------------------------------------------------- run folder parsing
def resolve_start(run_dir: Path, spec: str | None, init_dir: str) -> Start:
    """`--checkpoint` → Start. None: the initial model; step-N / latest / a folder."""
    from grpo_stream.learner.checkpoint import latest_checkpoint

    if spec is None:
        return Start(init_dir, 0, 0, None, "init")
    if spec == "latest":
        path = latest_checkpoint(str(run_dir))
        if path is None:
            raise ReplayError(f"--checkpoint latest: no checkpoint in {run_dir}/checkpoints")
    else:
        named = run_dir / "checkpoints" / spec
        path = named if re.fullmatch(r"step-\d+", spec) and named.is_dir() else Path(spec)
    if (path / "state.json").is_file() and (path / "model").is_dir():
        state = json.loads((path / "state.json").read_text())
        if "step" not in state:
            raise ReplayError(f"{path}/state.json: no 'step' field")
        return Start(str(path / "model"), int(state["step"]), state.get("version"), path, path.name)
    if (path / "config.json").is_file():  # a bare weights folder, e.g. RUN/weights/v3
        m = re.fullmatch(r"(?:v|step-)(\d+)", path.name)
        if m is None:
            raise ReplayError(
                f"--checkpoint {spec}: {path} is a model folder but its name says no step "
                "(expected vN or step-N, or a checkpoint folder with state.json)"
            )
        return Start(str(path), int(m.group(1)), int(m.group(1)), None, path.name)
    raise ReplayError(f"--checkpoint {spec}: {path} is neither a checkpoint nor a model folder")


def read_trained_batches(run_dir: Path) -> dict[int, dict]:
    """step → its record in trained_batches.jsonl (the last one wins after a resume)."""
    path = run_dir / "trained_batches.jsonl"
    if not path.is_file():
        raise ReplayError(f"{path}: missing (the learner writes it; is {run_dir} a run folder?)")
    out: dict[int, dict] = {}
    try:
        rows = jsonl.read(path)  # a torn last line (a learner killed mid-write) is left out
    except jsonl.JSONLError as e:
        raise ReplayError(f"{e} (not a trained-batch record)") from None
    for n, rec in enumerate(rows, 1):
        try:
            out[int(rec["step"])] = rec
        except (KeyError, TypeError, ValueError):
            raise ReplayError(f"{path}: record {n} is not a trained-batch record: "
                              f"{str(rec)[:80]}") from None  # fmt: skip
    return out


def select_steps(batches: dict[int, dict], after: int, count: int | None) -> list[dict]:
    """Records of the steps after `after` (consecutive), at most `count` of them."""
    steps = sorted(s for s in batches if s > after)
    if count is not None:
        steps = steps[:count]
    for want, have in enumerate(steps, after + 1):
        if want != have:
            raise ReplayError(f"trained_batches.jsonl: step {want} is missing (next is {have})")
    return [batches[s] for s in steps]


def load_step_groups(reader, rec: dict) -> list:
    """The groups step `rec` trained on, in the order it trained them."""
    from grpo_stream.buffer.store import GroupsDeletedError

    start, end = int(rec["cursor_start"]), int(rec["cursor_end"])
    try:
        by_id = {g[0].group_id: g for g in reader.read_groups(start, end) if g}
    except GroupsDeletedError:
        raise ReplayError(
            f"step {rec['step']}: groups {start}..{end - 1} were deleted from the buffer "
            "(retention); it cannot be replayed"
        ) from None
    ids = rec.get("group_ids", sorted(by_id))
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise ReplayError(
            f"step {rec['step']}: groups {missing[:5]} are not readable in the buffer"
        )
    return [by_id[i] for i in ids]


# ---------------------------------------------------------------- the learner state
class Replayer:
    """Model, optimizer and StepRunner in the state `start` describes, set up with the
    learner's own functions (threads, models, seeds)."""

    def __init__(self, cfg: Config, start: Start, init_dir: str, seed: int | None):
        import torch

        from grpo_stream.learner.checkpoint import load_trainer_state
        from grpo_stream.learner.distributed import DistInfo
        from grpo_stream.learner.optim import build_optimizer
        from grpo_stream.learner.policy import pick_device
        from grpo_stream.learner.setup import load_models, make_runner, seed_everything, set_threads

        self.cfg, self.start = cfg, start
        dist = DistInfo(0, 1, 0, pick_device(cfg.learner.device))  # one process
        self.device = dist.device
        set_threads(cfg, dist)
        if self.device.type == "cuda":  # deterministic kernels (embedding backward, cuBLAS)
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
        seed_everything(cfg.run.seed)
        self.model, ref = load_models(cfg, start.model_dir, init_dir, dist, tag="replay")
        opt, sched = build_optimizer(self.model, cfg.learner)
        self.runner = make_runner(cfg, self.model, ref, opt, sched, dist, init_dir,
                                  start.checkpoint)  # fmt: skip
        self.pad_id = self.runner.pad_id
        seed_everything(cfg.run.seed)  # where the learner seeds; a checkpoint restores its own
        if start.checkpoint is not None and (start.checkpoint / "trainer.pt").is_file():
            load_trainer_state(start.checkpoint, opt, sched)
            if self.runner.critic is not None:
                self.runner.critic.load_optimizer(start.checkpoint)
        if seed is not None:
            seed_everything(seed)

    def train(self, rec: dict, groups: list, wait_s: float) -> dict:
        """The recorded learner step `rec` on its `groups`: the row the learner logged."""
        import time

        from grpo_stream.learner.step import train_step, version_after

        t0, step = time.perf_counter(), int(rec[M.STEP])
        start, end = int(rec[M.CURSOR_START]), int(rec[M.CURSOR_END])
        # older records lack the stale count: every group of the range that was not trained
        stale = rec.get(M.STALE_GROUPS_DROPPED, end - start - len(groups))
        info = {M.CURSOR_START: start, M.CURSOR_END: end, M.STALE_GROUPS_DROPPED: stale}
        info[M.WAIT_S] = wait_s
        row = train_step(self.runner, groups, version_after(step - 1, self.cfg), info)
        if row is None:
            raise ReplayError(f"step {step}: none of its groups has a usable reward")
        row |= {M.STEP: step, M.POLICY_VERSION: version_after(step, self.cfg)}
        row[M.STEP_S] = time.perf_counter() - t0 + wait_s
        return row


# ---------------------------------------------------------------- the command
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="grpo-stream replay", description=__doc__.split("\n")[0])
    p.add_argument("run_dir", type=Path, help="a run folder (config.toml, trained_batches.jsonl)")
    p.add_argument("--checkpoint", default=None, help="step-N | latest | DIR (default: initial)")
    p.add_argument("--steps", type=int, default=None, help="replay at most K steps (default: all)")
    p.add_argument("--out", type=Path, default=None, help="default: RUN_DIR/replay/<checkpoint>")
    p.add_argument("--seed", type=int, default=None, help="RNG seed (default: run.seed)")
    p.add_argument("--check-logprobs", action="store_true", help="report log-prob drift")
    p.add_argument("--no-train", action="store_true", help="skip the training steps")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. learner.device=cpu")
    return p


def replay(args: argparse.Namespace) -> dict:
    """Run the replay `args` describe; returns {"metrics": rows, "drift": report|None}."""
    from grpo_stream.serving.model import resolve_model_path

    run_dir = args.run_dir
    cfg = load_run_config(run_dir, args.overrides, role="learn")  # the learner's config
    if args.steps is not None and args.steps < 0:
        raise ReplayError(f"--steps must be >= 0 (got {args.steps})")
    init_dir = str(resolve_model_path(cfg.model, cfg.sync.transport))
    start = resolve_start(run_dir, args.checkpoint, init_dir)
    records = select_steps(read_trained_batches(run_dir), start.step, args.steps)
    out = args.out or run_dir / "replay" / start.label
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)  # a replay's metrics start fresh
    rep = Replayer(cfg, start, init_dir, args.seed)
    batches = read_batches(cfg, run_dir, records)
    drift = None
    if args.check_logprobs:
        from grpo_stream.learner.drift import check_logprobs

        samples = [s for _, gs, _ in batches for g in gs for s in g]
        drift = check_logprobs(rep.model, samples, cfg, rep.pad_id, rep.device,
                               start.version, out)  # fmt: skip
    rows = [] if args.no_train else _train_all(rep, batches, out)
    print(f"[replay] {len(rows)} steps from {start.label} → {out}", file=sys.stderr)
    return {"metrics": rows, "drift": drift, "out": out}


def read_batches(cfg: Config, run_dir: Path, records: list[dict]) -> list[tuple]:
    """(record, its groups, seconds it took to read them) for each step, read with the
    run's `buffer.on_corrupt`."""
    import time

    from grpo_stream.buffer.store import open_reader

    try:
        reader = open_reader(buffer := cfg.buffer_path(str(run_dir)), cfg.buffer.on_corrupt)
    except FileNotFoundError:
        raise ReplayError(f"buffer {buffer}: no rollout store there") from None
    out = []
    try:
        for rec in records:
            t0 = time.perf_counter()
            groups = load_step_groups(reader, rec)
            out.append((rec, groups, time.perf_counter() - t0))
    finally:
        reader.close()
    return out


def _train_all(rep: Replayer, batches: list, out: Path) -> list[dict]:
    from grpo_stream.core.metrics import MetricsWriter

    writer, rows = MetricsWriter(str(out), tensorboard=False), []
    try:
        for rec, groups, wait_s in batches:
            rows.append(rep.train(rec, groups, wait_s))
            writer.log(rows[-1])
    finally:
        writer.close()
    return rows


def replay_cli(argv: list[str]) -> int:
    """`grpo-stream replay ...` (see the module docstring); 2 on a user error."""
    args = _parser().parse_intermixed_args(argv)
    try:
        replay(args)
    except UserError as e:  # a config, run folder, checkpoint or corrupt buffer
        print(f"grpo-stream replay: {e}", file=sys.stderr)
        return 2
    return 0
