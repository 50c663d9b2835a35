"""Setting up a learner: seeds, threads, device, models, optimizer, buffer cursor, resume.

    s = setup_learner(cfg, run_dir, model_dir, resume=False)   # then Learner(s).run()

`setup_learner` does everything the learner process needs before its first step and
says on stderr (rank 0) what it is doing, since loading can take a minute or two. The
pieces are shared with `replay`, so both train in the same state on the same number of
threads: `seed_everything`, `set_threads`, `load_models`, `pad_token_id`, `make_runner`.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from grpo_stream.buffer.cursor import GroupCursor
from grpo_stream.config import Config, ConfigError
from grpo_stream.learner.checkpoint import latest_checkpoint, load_trainer_state
from grpo_stream.learner.critic import load_critic, needs_reference
from grpo_stream.learner.distributed import (
    DistInfo,
    broadcast_object,
    init_distributed,
    mixed_precision_dtype,
    print0,
    shard_model,
)
from grpo_stream.learner.gather import load_full_optimizer_state
from grpo_stream.learner.heap import set_mmap_threshold
from grpo_stream.learner.lora import apply_lora, policy_folders
from grpo_stream.learner.optim import build_optimizer
from grpo_stream.learner.policy import load_causal_lm
from grpo_stream.learner.step import StepRunner


@dataclass
class LearnerSetup:
    """A learner ready for its first step (on rank 0 also the buffer cursor)."""

    cfg: Config
    run_dir: str
    dist: DistInfo
    model: torch.nn.Module  # FSDP2 ShardedPolicy under torchrun, else the HF model
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    runner: StepRunner
    cursor: GroupCursor | None  # rank 0 only: it alone reads the buffer
    step: int = 0
    version: int = 0
    resumed_from: Path | None = None


def seed_everything(seed: int) -> None:
    """Python (micro-batch order), NumPy and torch RNGs, identically on every rank."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_threads(cfg: Config, dist: DistInfo) -> None:
    """CPU threads for a CPU learner: `learner.num_threads`, else the cores split over
    the ranks (the thread count changes float summation order, so replay uses it too);
    and the heap's mmap threshold (`learner.heap`)."""
    if dist.device.type == "cpu":
        cores = (os.cpu_count() or 1) // dist.world_size
        torch.set_num_threads(cfg.learner.num_threads or max(1, cores))
    set_mmap_threshold(cfg.learner.malloc_mmap_threshold_kib)  # before any model loads


def load_models(cfg: Config, weights: str, initial: str, dist: DistInfo, tag: str = "learn"):
    """(policy from `weights`, reference from `initial` or None when beta = 0), sharded
    under torchrun. With [lora] the policy is the initial model with an adapter (fresh,
    or `weights`' when that is an adapter folder), and the reference is the policy itself,
    used with its adapter off (`learner.lora`)."""
    t0 = time.perf_counter()
    # under FSDP2 load on CPU: shard_model moves only each rank's shards to its GPU
    load_to = torch.device("cpu") if dist.world_size > 1 else dist.device
    try:  # LoRA: the base is the initial model, the adapter a checkpoint's (learner.lora)
        weights, adapter = policy_folders(cfg.lora, weights, initial)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    print0(f"[{tag}] loading the policy from {weights} onto {load_to} ...")
    model = load_causal_lm(weights, load_to)
    if cfg.learner.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if cfg.lora.enabled:
        print0(f"[{tag}] LoRA rank {cfg.lora.rank} on {cfg.lora.target_modules} ...")
        model = apply_lora(model, cfg.lora, adapter)
    ref = None
    if needs_reference(cfg) and not cfg.lora.enabled:  # the initial policy, frozen
        print0(f"[{tag}] loading the reference model from {initial} (KL in loss or reward) ...")
        ref = load_causal_lm(initial, load_to, trainable=False)
    if dist.world_size > 1:
        mp = mixed_precision_dtype(cfg.learner.dtype, dist.device)
        print0(f"[{tag}] FSDP2 over {dist.world_size} processes on {dist.device}: sharding ...")
        model = shard_model(model, dist, mp)
        ref = shard_model(ref, dist, mp) if ref is not None else None
    if cfg.lora.enabled and needs_reference(cfg):  # the reference: this model, adapter off
        ref = model
    print0(f"[{tag}] models ready in {time.perf_counter() - t0:.1f}s")
    return model, ref


def pad_token_id(model_dir: str) -> int:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def make_runner(cfg: Config, model, ref, opt, sched, dist: DistInfo, model_dir: str,
                ckpt: Path | None = None):  # fmt: skip
    """The StepRunner, with its critic (loss.advantage = "gae"; from `ckpt` on a resume)."""
    runner = StepRunner(cfg, model, ref, opt, sched, dist.device, pad_token_id(model_dir),
                        world=dist.world_size, rank=dist.rank)  # fmt: skip
    runner.critic = load_critic(cfg, model_dir, dist, ckpt)
    return runner


def _final_groups(buffer_path: str) -> int | None:
    """The groups the buffer will hold, once the generator finished its work (its prompt
    source ran out, or generator.stop_after_groups); None while more may come."""
    from grpo_stream.core.generator_end import read_generator_end

    end = read_generator_end(buffer_path)
    return end.groups if end is not None and end.work_done else None


def open_cursor(cfg: Config, run_dir: str) -> GroupCursor:
    """The learner's cursor over the buffer, with `buffer.on_corrupt` and `buffer.poll_s`;
    waits up to `learner.wait_timeout_s` for the generator to create the store."""
    from grpo_stream.buffer.store import open_reader

    path, timeout_s = cfg.buffer_path(run_dir), cfg.learner.wait_timeout_s
    deadline = time.monotonic() + timeout_s
    told = False
    while True:
        try:
            reader = open_reader(path, on_corrupt=cfg.buffer.on_corrupt)
            cursor = GroupCursor(reader, poll_s=cfg.buffer.poll_s)
            cursor.final_groups = lambda: _final_groups(path)
            return cursor
        except FileNotFoundError:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"buffer {path}: no store appeared within {timeout_s:.0f}s"
                ) from None
            if not told:
                print0(f"[learn] waiting for the generator to create the buffer {path} ...")
                told = True
            time.sleep(cfg.buffer.poll_s)


def _resume(s: LearnerSetup, ckpt: Path) -> None:
    load_opt = None
    if s.dist.world_size > 1:  # a full (per-name) state, broadcast from rank 0

        def load_opt(full):
            load_full_optimizer_state(s.model, s.opt, full if s.dist.is_rank0 else {})

    try:
        state = load_trainer_state(ckpt, s.opt, s.sched, load_opt)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    s.step, s.version, s.resumed_from = state["step"], state["version"], ckpt
    if s.runner.critic is not None:
        s.runner.critic.load_optimizer(ckpt)
    if s.cursor is not None:
        s.cursor.load_state(state["cursor"])
        print0(f"[learn] resumed from {ckpt} at step {s.step}, cursor {s.cursor.position}")


def setup_learner(cfg: Config, run_dir: str, model_dir: str, resume: bool = False):
    """Everything before the first step; see the module docstring."""
    seed_everything(cfg.run.seed)  # before loading: every rank initialises alike
    dist = init_distributed(cfg.learner.device)
    set_threads(cfg, dist)
    # every rank resumes from rank 0's checkpoint
    ckpt = broadcast_object(latest_checkpoint(run_dir) if resume else None)
    model, ref = load_models(cfg, str(ckpt / "model") if ckpt else model_dir, model_dir, dist)
    opt, sched = build_optimizer(model, cfg.learner)  # after sharding (DTensor parameters)
    runner = make_runner(cfg, model, ref, opt, sched, dist, model_dir, ckpt)
    cursor = open_cursor(cfg, run_dir) if dist.is_rank0 else None
    s = LearnerSetup(cfg, run_dir, dist, model, opt, sched, runner, cursor)
    seed_everything(cfg.run.seed)  # as replay does after loading; a resume restores its own
    if ckpt is not None:
        _resume(s, ckpt)
    return s
