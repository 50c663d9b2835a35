"""One learner step on one batch of groups: the μ-epoch clipped GRPO update.

    advantages  ← group-relative, from the rewards          (algo.compute_advantages)
    old_lp      ← learner log-probs at batch start, no grad (the proximal policy); with
                  one optimizer step per epoch, epoch 1's own forward at the same
                  weights, detached (no extra pass), else a no-grad pass first
    ref_lp      ← frozen reference log-probs (only when β > 0)
    for epoch in 1..μ:                 micro-batches shuffled each epoch
        for each of `minibatches` optimizer steps:
            Σ micro-batches: grpo_loss(...).backward()     (batch-global normalisers;
                             fused with the output layer: algo.fused_loss_from_hidden)
            clip grad norm; AdamW step; scheduler step

Micro-batches are collated once per step and reused by every epoch.

`train_step(runner, groups, version, batch)` is THE learner step: `learn` and `replay`
both call it on the groups the cursor delivered, and it returns the one metrics row
(names in `grpo_stream.core.metric_names`) both log; the caller adds the step number, the
policy version after the step and its wall-clock time.
"""

from __future__ import annotations

import math
import random
import time
from collections import defaultdict

import torch

from grpo_stream.algo import compute_advantages, grpo_loss
from grpo_stream.buffer.schema import Group
from grpo_stream.config import Config
from grpo_stream.config.transports import transport_traits
from grpo_stream.core import metric_names as M
from grpo_stream.learner.batch import MicroBatch
from grpo_stream.learner.lora import adapter_disabled
from grpo_stream.learner.plan import plan_micro_batches
from grpo_stream.learner.policy import autocast, sequence_logprobs, sequence_loss


def usable_groups(groups: list[Group]) -> tuple[list[Group], int]:
    """Drop groups with a failed (non-finite) reward: their advantage is unknown."""
    ok = [g for g in groups if all(math.isfinite(s.reward) for s in g)]
    return ok, len(groups) - len(ok)


def batch_advantages(groups: list[Group], cfg: Config) -> tuple[list, list[float], dict]:
    rewards = torch.tensor([[s.reward for s in g] for g in groups], dtype=torch.float32)  # [N, G]
    adv, keep, metrics = compute_advantages(rewards, cfg.loss)  # [N, G], [N]
    samples, advs = [], []
    for gi, g in enumerate(groups):
        if bool(keep[gi]):
            samples.extend(g)
            advs.extend(adv[gi].tolist())
    return samples, advs, metrics


class MetricMean:
    """Token-weighted mean of the loss metrics over micro-batches (and, under torchrun,
    ranks); `*_min` / `*_max` metrics are the extreme over them instead, and `loss` (each
    micro-batch's share of its optimizer batch's loss) sums to the batch loss, averaged
    over the optimizer steps (`end_step`). `num_tokens` and `num_seqs` are the weights,
    not means: the step's counts come from `StepRunner.run`.

    Every key seen is kept even when all its values were non-finite, so ranks running
    the same config reduce the same keys.
    """

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.weights: dict[str, float] = defaultdict(float)
        self.mins: dict[str, float] = {}
        self.maxs: dict[str, float] = {}
        self.loss, self.steps = 0.0, 0

    def end_step(self) -> None:
        self.steps += 1

    def add(self, metrics: dict, weight: float) -> None:
        for k, v in metrics.items():
            if k in (M.NUM_TOKENS, M.NUM_SEQS) or v is None:
                continue
            v = float(v)
            ok = math.isfinite(v)
            if k == M.LOSS:
                self.loss += v  # non-finite stays visible: a NaN loss must show
            elif k.endswith("_min"):
                self.mins[k] = min(self.mins.get(k, math.inf), v if ok else math.inf)
            elif k.endswith("_max"):
                self.maxs[k] = max(self.maxs.get(k, -math.inf), v if ok else -math.inf)
            else:
                self.sums[k] += v * weight if ok else 0.0
                self.weights[k] += weight if ok else 0.0

    def result(self, world: int = 1) -> dict[str, float]:
        sums, weights, mins, maxs = dict(self.sums), dict(self.weights), self.mins, self.maxs
        if world > 1:  # collective: every rank calls it with the same keys
            from grpo_stream.learner.distributed import all_reduce_scalars

            sums[M.LOSS] = self.loss  # reduced with the rest, then taken out again
            if sums:
                sums = all_reduce_scalars(sums, "sum")
                weights = all_reduce_scalars(weights, "sum")
            mins = all_reduce_scalars(mins, "min") if mins else mins
            maxs = all_reduce_scalars(maxs, "max") if maxs else maxs
        loss = sums.pop(M.LOSS, self.loss)
        out = {k: sums[k] / weights[k] for k in sums if weights[k] > 0}
        out |= {k: v for k, v in {**mins, **maxs}.items() if math.isfinite(v)}
        if self.steps:
            out[M.LOSS] = loss / self.steps
        return out


def epoch_metrics(meters: list[MetricMean], world: int) -> dict[str, float]:
    """The clip fraction and approximate KL(pi_old || pi_theta) of each epoch index
    (`clip_frac/epoch1`, ...): where the policy moves within a batch, and the clip acts."""
    out = {}
    for e, meter in enumerate(meters, start=1):
        r = meter.result(world)  # collective under torchrun: every rank, same keys
        out[M.clip_frac_epoch(e)] = r.get(M.CLIP_LOW_FRAC, 0.0) + r.get(M.CLIP_HIGH_FRAC, 0.0)
        if M.APPROX_KL_PROXIMAL in r:
            out[M.approx_kl_epoch(e)] = r[M.APPROX_KL_PROXIMAL]
    return out


def _global(values: dict[str, float], world: int) -> dict[str, float]:
    """Sums over ranks under torchrun (the loss normalisers must be batch-global)."""
    if world == 1:
        return values
    from grpo_stream.learner.distributed import all_reduce_scalars

    return all_reduce_scalars(values)


class StepRunner:
    """The μ-epoch update on one batch of samples; `run` returns its metrics."""

    def __init__(
        self, cfg: Config, model, ref_model, optimizer, scheduler, device, pad_id: int,
        world: int = 1, rank: int = 0,
    ):  # fmt: skip
        self.cfg, self.model, self.ref = cfg, model, ref_model
        self.opt, self.sched, self.device, self.pad_id = optimizer, scheduler, device, pad_id
        self.temperature = cfg.generator.temperature
        self.world, self.rank = world, rank  # world > 1: model/ref are FSDP2 ShardedPolicy
        from grpo_stream.learner.distributed import ShardedPolicy

        # a ShardedPolicy computes its own log-probs/loss (FSDP does precision), even on
        # one rank (bench.gpu_smoke runs FSDP2 with one rank)
        self.sharded = world > 1 or isinstance(model, ShardedPolicy)
        self.critic = None  # learner.critic.Critic when loss.advantage = "gae" (make_runner)

    def _logprobs(self, model, mb: MicroBatch, entropy: bool = False):
        chunk = self.cfg.learner.logprob_chunk_size
        if self.sharded:  # ShardedPolicy.forward is sequence_logprobs; FSDP does precision
            return model(mb, self.temperature, chunk, entropy)
        with autocast(self.device, self.cfg.learner.dtype):
            return sequence_logprobs(model, mb, self.temperature, chunk, entropy)

    def _fused_loss(self, mb: MicroBatch, loss_fn):
        """(loss, log-probs [B, T], entropy [B, T]) with the output layer fused in."""
        chunk = self.cfg.learner.logprob_chunk_size
        if self.sharded:
            return self.model(mb, self.temperature, chunk, True, loss_fn=loss_fn)
        with autocast(self.device, self.cfg.learner.dtype):
            return sequence_loss(self.model, mb, self.temperature, chunk, loss_fn, True)

    def _micro_batch_loss(self, mb: MicroBatch, old, ref, totals) -> tuple:
        """Backward-ready loss of one micro-batch, its metrics and its log-probs [B, T];
        `old` None: pi_old is these log-probs, detached (before any optimizer step)."""
        fixed = (old, mb.behaviour_logprobs, mb.advantages, mb.mask, ref)  # each [B, ...]
        loss_cfg = self.cfg.resolved_loss()  # the constant normaliser derived on use

        def loss_of(rows, lp, ent, metrics: bool):
            o, b, a, m, r = (None if x is None else x[rows] for x in fixed)
            if o is None:  # pi_old = this forward's own log-probs (weights not yet moved)
                o = lp.detach().float()
            ent = None if ent is None else ent.float()
            kw = dict(ref_logprobs=r, entropy=ent, metrics=metrics)
            return grpo_loss(loss_cfg, lp.float(), o, b, a, m, **totals, **kw)

        everything = slice(None)
        if not self.cfg.learner.fused_loss:
            lp, ent = self._logprobs(self.model, mb, entropy=True)  # [B, T], [B, T]
            return *loss_of(everything, lp, ent, True), lp.detach()
        loss, lp, ent = self._fused_loss(mb, lambda rows, x, e: loss_of(rows, x, None, False)[0])
        with torch.no_grad():  # metrics from the whole micro-batch's detached log-probs
            _, metrics = loss_of(everything, lp, ent, True)
        return loss, metrics | {M.LOSS: float(loss.detach())}, lp

    def _clip_grad(self) -> float:
        if self.sharded:
            from grpo_stream.learner.distributed import clip_grad_norm

            return clip_grad_norm(self.model.parameters(), self.cfg.learner.max_grad_norm)
        return float(
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.learner.max_grad_norm)
        )

    @torch.no_grad()
    def _frozen_logprobs(self, mbs: list[MicroBatch], own_pass: bool) -> tuple[list, list]:
        """pi_old's log-probs (`own_pass`: a no-grad pass now; else None, filled in by
        epoch 1's forward) and the reference's (None when beta = 0)."""
        old: list = [None] * len(mbs)
        if own_pass:
            was_training = self.model.training
            self.model.eval()
            old = [self._logprobs(self.model, mb)[0].float() for mb in mbs]  # each [B, T]
            self.model.train(was_training)
        ref = [None] * len(mbs)
        if self.ref is not None:  # beta > 0 or the KL in the reward; LoRA: the policy
            with adapter_disabled(self.ref):  # itself with its adapter off (else a no-op)
                ref = [self._logprobs(self.ref, mb)[0].float() for mb in mbs]
        return old, ref

    def _optimizer_step(self, mbs, old, ref, order, meter: MetricMean, epoch_meter=None) -> float:
        local = {
            "tokens": float(sum(mbs[i].num_tokens for i in order)),
            "seqs": float(sum(self.real_seqs[i] for i in order)),
        }  # the loss normalisers, not metrics
        totals = _global(local, self.world)
        totals = {"total_tokens": totals["tokens"], "total_seqs": totals["seqs"]}
        self.opt.zero_grad(set_to_none=True)
        if self.critic is not None:
            self.critic.zero_grad()
        for i in order:
            loss, m, lp = self._micro_batch_loss(mbs[i], old[i], ref[i], totals)
            loss.backward()
            if self.critic is not None:  # the value loss on the same micro-batch
                meter.add(self.critic.train_micro_batch(i, mbs[i], totals["total_tokens"]),
                          mbs[i].num_tokens)  # fmt: skip
            if old[i] is None:  # epoch 1 at the batch's starting weights: pi_old from now on
                old[i] = lp.float()  # [B, T]
            meter.add(m, mbs[i].num_tokens)
            if epoch_meter is not None:  # this epoch index's own means (epoch_metrics)
                epoch_meter.add(m, mbs[i].num_tokens)
        meter.end_step()
        gn = self._clip_grad()
        self.opt.step()
        self.sched.step()
        if self.critic is not None:
            meter.add({M.CRITIC_GRAD_NORM: self.critic.step()}, 1.0)
        return gn

    def run(self, samples, advantages: list[float]) -> dict[str, float]:
        lc = self.cfg.learner
        mbs = plan_micro_batches(samples, advantages, lc, self.pad_id, self.model, self.world)
        mbs = [mb.to(self.device) for mb in mbs]
        real = [1] * len(samples)
        if self.world > 1:  # FSDP padding samples carry no tokens and are no sequence
            from grpo_stream.learner.distributed import is_padding

            real = [0 if is_padding(x) else 1 for x in samples]
        # index -1: a padding micro-batch's row (learner.plan), no sequence
        self.real_seqs = [sum(real[i] for i in mb.index.tolist() if i >= 0) for mb in mbs]
        n_mini = min(lc.minibatches_per_epoch, len(mbs))
        t0 = time.perf_counter()
        # one optimizer step per epoch: every epoch-1 forward runs at the starting weights
        old, ref = self._frozen_logprobs(mbs, own_pass=n_mini > 1)
        critic_m = self.critic.prepare(mbs, ref) if self.critic is not None else {}
        t1 = time.perf_counter()
        meter, grad_norms = MetricMean(), []
        epoch_meters = [MetricMean() for _ in range(lc.epochs)]
        for e in range(lc.epochs):
            order = random.sample(range(len(mbs)), len(mbs))
            for k in range(n_mini):
                part = order[k::n_mini]
                grad_norms.append(self._optimizer_step(mbs, old, ref, part, meter, epoch_meters[e]))
        t2 = time.perf_counter()
        out = meter.result(self.world) | epoch_metrics(epoch_meters, self.world) | critic_m
        counts = {M.TOKENS: sum(int(mb.attention_mask.sum()) for mb in mbs),
                  M.COMPLETION_TOKENS: sum(mb.num_tokens for mb in mbs),
                  M.NUM_SEQS: sum(self.real_seqs)}  # fmt: skip
        times = {M.PROXIMAL_S: t1 - t0, M.TRAIN_S: t2 - t1}
        if self.world > 1:  # the whole batch's tokens, the slowest rank's times
            from grpo_stream.learner.distributed import all_reduce_scalars

            counts, times = all_reduce_scalars(counts, "sum"), all_reduce_scalars(times, "max")
        out.update(counts)
        out.update(times)
        out[M.GRAD_NORM] = sum(grad_norms) / len(grad_norms)
        out[M.LR] = self.sched.get_last_lr()[0]
        out[M.TOKENS_PER_S] = counts[M.TOKENS] * lc.epochs / max(times[M.TRAIN_S], 1e-9)
        return out


def version_after(step: int, cfg: Config) -> int:
    """The policy version after `step` learner steps: the last step whose weights were
    synced (every `sync.every` steps); with no servers to sync, every step's."""
    if not transport_traits(cfg.sync.transport).versions_servers:
        return step
    return step // cfg.sync.every * cfg.sync.every


def _mean_std(xs: list[float]) -> tuple[float, float]:
    """Population mean and std (0, 0 for no values)."""
    if not xs:
        return 0.0, 0.0
    mean = sum(xs) / len(xs)
    return mean, (sum((x - mean) ** 2 for x in xs) / len(xs)) ** 0.5


def train_step(runner: StepRunner, groups: list[Group], version: int, batch: dict) -> dict | None:
    """The learner step on the groups the cursor delivered (stale ones already dropped)
    while the learner held policy `version`: drops groups with a failed reward, computes
    advantages, trains this rank's shard, and returns the metrics row with `batch` (the
    cursor's record of the batch) merged in; None when no group had a usable reward."""
    groups, failed = usable_groups(groups)
    if not groups:
        return None
    samples, advs, adv_m = batch_advantages(groups, runner.cfg)
    rewards = [s.reward for g in groups for s in g]
    staleness = [version - s.policy_version for s in samples] or [0]
    m: dict = {}
    if samples:  # drop_zero_variance may leave none: a step that changes nothing
        if runner.world > 1:
            from grpo_stream.learner.distributed import shard_batch

            samples, advs = shard_batch(samples, advs, runner.rank, runner.world)
        m = runner.run(samples, advs)
    mean, std = _mean_std(rewards)
    row = {**adv_m, **m, **batch, M.REWARD_MEAN: mean, M.REWARD_STD: std}
    row |= {M.REWARD_MIN: min(rewards), M.REWARD_MAX: max(rewards)}
    row |= {M.STALENESS_MEAN: sum(staleness) / len(staleness), M.STALENESS_MAX: max(staleness)}
    row |= {M.GROUPS: len(groups), M.SAMPLES: len(rewards), M.REWARD_FAILED_GROUPS: failed}
    # `kl`: to the reference when beta > 0, else the approximate KL(pi_old || pi_theta)
    row[M.KL] = m.get(M.KL_REF, m.get(M.APPROX_KL_PROXIMAL, 0.0))
    row[M.CLIP_FRAC] = m.get(M.CLIP_LOW_FRAC, 0.0) + m.get(M.CLIP_HIGH_FRAC, 0.0)
    row.setdefault(M.TOKENS_PER_S, 0.0)
    return row
