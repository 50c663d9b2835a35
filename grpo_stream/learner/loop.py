"""The learner process: buffer → μ-epoch GRPO step → checkpoint → weight sync.

    Learner(cfg, run_dir, model_dir, resume=False).run()

Each step takes the next `learner.batch_groups` complete groups from the buffer
(groups older than `learner.max_staleness` versions are dropped and counted), runs
`StepRunner`, publishes its progress for the generator's staleness gate, writes a
checkpoint when due, and every `sync.every` steps pushes the weights into the vLLM
servers, which then stamp new samples with the new version. Policy version N means
"the weights after N learner steps"; it is what the servers report in /weight_info.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import numpy as np
import torch

from grpo_stream.buffer.cursor import GroupCursor
from grpo_stream.config import Config, ConfigError
from grpo_stream.learner.checkpoint import latest_checkpoint, load_trainer_state, save_checkpoint
from grpo_stream.learner.distributed import (
    broadcast_object,
    full_optimizer_state_dict_on_rank0,
    full_state_dict_on_rank0,
    init_distributed,
    load_full_optimizer_state,
    mixed_precision_dtype,
    shard_batch,
    shard_model,
    unwrap,
)
from grpo_stream.learner.optim import build_optimizer
from grpo_stream.learner.policy import load_causal_lm
from grpo_stream.learner.step import StepRunner, batch_advantages, usable_groups
from grpo_stream.metrics import MetricsWriter, stderr
from grpo_stream.progress import LearnerProgress, write_progress


def wait_for_store(path: str, timeout_s: float):
    from grpo_stream.buffer.store import open_reader

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return open_reader(path)
        except FileNotFoundError:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"buffer {path}: no store appeared within {timeout_s:.0f}s"
                ) from None
            time.sleep(0.5)


def truncate_log(path: str, step: int) -> None:
    """Keep the JSONL rows with row["step"] <= step (atomically)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        rows = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(path + ".tmp", "w") as f:
        f.writelines(rows)
    os.replace(path + ".tmp", path)


def make_sync(cfg: Config, run_dir: str):
    if cfg.sync.transport == "none":
        return None
    if cfg.sync.transport == "disk":
        from grpo_stream.sync.disk import DiskSync

        return DiskSync(cfg.sync, cfg.server.resolved_urls(), Path(run_dir) / "weights")
    from grpo_stream.sync.nccl import NCCLSync

    return NCCLSync(cfg.sync, cfg.server.resolved_urls())


class Learner:
    """One learner process; under torchrun, one rank of an FSDP2 data-parallel learner.

    Rank 0 alone reads the buffer (and broadcasts each batch), writes metrics, progress and
    checkpoints, and syncs the servers; every rank trains on its shard of the batch.
    """

    def __init__(self, cfg: Config, run_dir: str, model_dir: str, resume: bool = False):
        self.cfg, self.run_dir, self.model_dir = cfg, run_dir, model_dir
        torch.manual_seed(cfg.run.seed)
        random.seed(cfg.run.seed)  # micro-batch order: replay must reproduce it
        np.random.seed(cfg.run.seed)
        self.dist = init_distributed(cfg.learner.device)
        self.rank0 = self.dist.rank == 0
        self.device = self.dist.device
        if self.device.type == "cpu":
            cores = (os.cpu_count() or 1) // self.dist.world_size
            torch.set_num_threads(cfg.learner.num_threads or max(1, cores))
        ckpt = latest_checkpoint(run_dir) if resume else None
        if self.dist.world_size > 1:  # every rank must resume from rank 0's checkpoint
            ckpt = broadcast_object(ckpt)
            if self.rank0:
                stderr(f"[learn] FSDP2 over {self.dist.world_size} processes on {self.device}")
        self._load_models(str(ckpt / "model") if ckpt else model_dir)
        self.opt, self.sched = build_optimizer(self.model, cfg.learner)  # after sharding
        self.buffer_path = cfg.buffer_path(run_dir)
        self.cursor = None
        if self.rank0:
            self.cursor = GroupCursor(wait_for_store(self.buffer_path, cfg.learner.wait_timeout_s))
        self.step, self.version = 0, 0
        if ckpt is not None:
            self._resume(ckpt)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.runner = StepRunner(cfg, self.model, self.ref, self.opt, self.sched, self.device, pad,
                                 world=self.dist.world_size)  # fmt: skip
        self.sync = make_sync(cfg, run_dir) if self.rank0 or cfg.sync.transport == "nccl" else None
        self.metrics = MetricsWriter(run_dir) if self.rank0 else None
        self.trained_batches = os.path.join(run_dir, "trained_batches.jsonl")
        if ckpt is not None and self.rank0:  # the logs follow the checkpoint's lineage
            truncate_log(self.trained_batches, self.step)
            truncate_log(self.metrics.path, self.step)

    def _load_models(self, path: str) -> None:
        cfg, world = self.cfg, self.dist.world_size
        self.model = load_causal_lm(path, self.device)
        if cfg.learner.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        # the reference is the initial policy; with beta = 0 it is never loaded
        self.ref = None
        if cfg.loss.beta > 0:
            self.ref = load_causal_lm(self.model_dir, self.device, trainable=False)
        if world > 1:
            mp = mixed_precision_dtype(cfg.learner.dtype, self.device)
            self.model = shard_model(self.model, self.dist, mp)
            self.ref = shard_model(self.ref, self.dist, mp) if self.ref is not None else None

    def _resume(self, ckpt: Path) -> None:
        load_opt = None
        if self.dist.world_size > 1:  # a full (per-name) state, broadcast from rank 0

            def load_opt(full):
                load_full_optimizer_state(self.model, self.opt, full if self.rank0 else {})

        try:
            state = load_trainer_state(ckpt, self.opt, self.sched, load_opt)
        except ValueError as err:
            raise ConfigError(str(err)) from err
        self.step, self.version = state["step"], state["version"]
        if self.cursor is not None:  # rank 0 reads the buffer
            self.cursor.load_state(state["cursor"])
        if self.rank0:
            stderr(
                f"[learn] resumed from {ckpt} at step {self.step}, cursor {self.cursor.position}"
            )

    def _next_batch(self):
        lc = self.cfg.learner
        payload = None
        if self.rank0:
            t0 = time.perf_counter()
            start = self.cursor.position
            groups, stale = self.cursor.next_groups(
                lc.batch_groups, lc.wait_timeout_s, lc.max_staleness, current_version=self.version
            )
            groups, failed = usable_groups(groups)
            info = {"wait_s": time.perf_counter() - t0, "stale_groups_dropped": stale,
                    "reward_failed_groups": failed, "cursor_start": start,
                    "cursor_end": self.cursor.position}  # fmt: skip
            payload = (groups, info)
        if self.dist.world_size > 1:  # one reader: ranks never disagree on the batch
            payload = broadcast_object(payload)
        return payload

    def _record_batch(self, groups, info: dict) -> None:
        if not self.rank0:
            return
        row = {"step": self.step, "group_ids": [g[0].group_id for g in groups]}
        row.update({k: info[k] for k in ("cursor_start", "cursor_end")})
        with open(self.trained_batches, "a") as f:
            f.write(json.dumps(row) + "\n")

    def train_one(self) -> dict:
        groups, info = self._next_batch()
        if not groups:
            stderr(f"[learn] step {self.step}: every group was stale or failed; skipping")
            return {}
        samples, advs, adv_m = batch_advantages(groups, self.cfg)
        rewards = [s.reward for g in groups for s in g]
        staleness = [self.version - s.policy_version for s in samples] or [0]
        if self.dist.world_size > 1:
            samples, advs = shard_batch(samples, advs, self.dist.rank, self.dist.world_size)
        m = self.runner.run(samples, advs) if samples else {}
        self.step += 1
        self._record_batch(groups, info)
        mean = sum(rewards) / len(rewards)
        std = (sum((r - mean) ** 2 for r in rewards) / len(rewards)) ** 0.5
        return {**adv_m, **m, **info, "reward_mean": mean, "reward_std": std,
                "staleness_mean": sum(staleness) / len(staleness),
                "staleness_max": max(staleness), "groups": len(groups),
                "samples": len(rewards)}  # fmt: skip

    def _full_state(self):
        """None in one process; under FSDP every rank gathers, rank 0 gets the weights."""
        if self.dist.world_size == 1:
            return None
        return full_state_dict_on_rank0(self.model)

    def _publish_progress(self) -> None:
        if self.rank0:
            progress = LearnerProgress(self.cursor.position, self.version, self.step)
            write_progress(self.buffer_path, progress)

    def _after_step(self, m: dict) -> dict:
        cfg = self.cfg
        ck = cfg.learner.checkpoint_every
        due_ckpt = (ck and self.step % ck == 0) or self.step == cfg.learner.max_steps
        due_sync = self.step % cfg.sync.every == 0
        sd = self._full_state() if (due_ckpt or due_sync) else None
        opt_sd = None
        if due_ckpt and self.dist.world_size > 1:  # collective: every rank gathers
            opt_sd = full_optimizer_state_dict_on_rank0(self.model, self.opt)
        hf = unwrap(self.model)
        if due_sync or cfg.sync.transport == "none":
            self.version = self.step
        if self.sync is not None and due_sync:
            target = self.model if cfg.sync.transport == "nccl" else hf
            m.update(self.sync.push(target, self.version, state_dict=sd) or {})
        self._publish_progress()
        if due_ckpt and self.rank0:
            state = {"version": self.version, "cursor": self.cursor.state()}
            save_checkpoint(self.run_dir, self.step, hf, self.opt, self.sched, state,
                            state_dict=sd, optimizer_state=opt_sd)  # fmt: skip
        return m

    def run(self) -> None:
        if self.step > 0:
            # a resumed learner owns the truth: the servers may hold newer (discarded) weights
            sd = self._full_state()  # collective under torchrun
            if self.sync is not None:
                target = self.model if self.cfg.sync.transport == "nccl" else unwrap(self.model)
                self.sync.push(target, self.version, state_dict=sd)
        self._publish_progress()
        while self.step < self.cfg.learner.max_steps:
            t0 = time.perf_counter()
            m = self.train_one()
            if not m:
                continue
            m = self._after_step(m)
            m.update(step=self.step, policy_version=self.version, step_s=time.perf_counter() - t0)
            # `kl`: to the reference when beta > 0, else the approximate KL(pi_old || pi_theta)
            m["kl"] = m.get("kl_ref", m.get("approx_kl_proximal", 0.0))
            m["clip_frac"] = m.get("clip_low_frac", 0.0) + m.get("clip_high_frac", 0.0)
            if self.metrics is not None:
                self.metrics.log(m)
        if self.metrics is not None:
            self.metrics.close()
