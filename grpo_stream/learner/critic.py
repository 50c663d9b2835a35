"""PPO's critic beside the actor (`loss.advantage = "gae"`): a value model and its update.

    critic = load_critic(cfg, init_dir, dist, ckpt)      # None unless loss.advantage = "gae"
    runner.critic = critic                               # learner.setup.make_runner does it
    # in StepRunner.run, once per batch, after the proximal/reference passes:
    metrics = critic.prepare(mbs, ref)   # V_old, GAE: mb.advantages becomes [B, T]
    # in each optimizer step, on the actor's micro-batches:
    critic.zero_grad(); m = critic.train_micro_batch(i, mb, total_tokens); gn = critic.step()

The value model is a Hugging Face decoder with one scalar per token
(`AutoModelForTokenClassification`, one label), loaded from `critic.init`: the initial
policy ("policy": a new head, zero, so V starts at 0) or a folder (a one-label reward
model keeps its `score` head). Its hidden states come from the actor's own layouts
(`learner.policy.final_hidden`: padded or shared prefix), so column j's value is the
state before completion token j. It has its own AdamW (`critic.lr`, constant), the
actor's betas, `critic.max_grad_norm`, and trains in the actor's mu epochs on the
actor's micro-batches, with batch-global normalisers (so FSDP ranks sum to one
process). Before the epochs `prepare` takes V_old once (like the proximal log-probs),
turns each sequence's reward (`algo.advantages` passes it on unchanged under "gae")
into per-token rewards (plus `-loss.kl_in_reward * (log pi_b - log pi_ref)`, the
sampling policy's KL to the reference, when set), runs GAE and whitens over the whole
batch. It is checkpointed with the actor (`RUN/checkpoints/step-N/critic/`: weights and
`optimizer.pt`), sharded under FSDP2 like it, and never synced to vLLM.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from grpo_stream.algo.gae import (
    explained_variance,
    gae,
    masked_moments,
    masked_whiten,
    moments_mean_std,
    token_rewards,
    value_loss,
)
from grpo_stream.config import Config, ConfigError
from grpo_stream.core import metric_names as M
from grpo_stream.learner.batch import MicroBatch
from grpo_stream.learner.distributed import (
    DistInfo,
    ShardedPolicy,
    all_reduce_scalars,
    clip_grad_norm,
    is_distributed,
    mixed_precision_dtype,
    print0,
    shard_model,
    unwrap,
)
from grpo_stream.learner.gather import full_optimizer_state_dict_on_rank0, load_full_optimizer_state
from grpo_stream.learner.policy import autocast, final_hidden

CRITIC_DIR = "critic"  # in a checkpoint folder: the value model and optimizer.pt
OPTIMIZER_FILE = "optimizer.pt"


def uses_critic(cfg: Config) -> bool:
    return cfg.loss.advantage == "gae"


def needs_reference(cfg: Config) -> bool:
    """The reference model is loaded for the KL in the loss (beta) or in the reward."""
    return cfg.loss.beta > 0 or (uses_critic(cfg) and cfg.loss.kl_in_reward > 0)


def token_values(model, mb: MicroBatch) -> torch.Tensor:
    """The value model's scalar per target column: [B, T], float32."""
    hidden = final_hidden(model, mb)  # [B, T, H]
    return model.score(hidden).squeeze(-1).float()  # [B, T]


class ShardedCritic(ShardedPolicy):
    """FSDP root around the value model; forward = `token_values` (unwrap() sees through)."""

    def forward(self, mb):  # [B, T]; the root's hooks have gathered embed, norm and score
        return token_values(self.module, mb)


def load_value_model(path: str, device: torch.device):
    """A one-label token-classification model from `path`, dropout off, a missing head 0."""
    from transformers import AutoModelForTokenClassification
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its report of the new head and the unused lm_head
    try:
        model, info = AutoModelForTokenClassification.from_pretrained(
            path, num_labels=1, dtype=torch.float32, output_loading_info=True
        )
    except (OSError, ValueError) as err:
        raise ConfigError(f"critic.init: cannot load a value model from {path}: {err}") from err
    finally:
        hf_logging.set_verbosity(level)
    missing = set(info.get("missing_keys", ()))
    with torch.no_grad():  # a fresh head starts at V = 0 (deterministic, no RNG)
        for name, p in model.score.named_parameters():
            if f"score.{name}" in missing:
                p.zero_()
    for m in model.modules():  # dropout would make V_old and V differ at equal weights
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model.to(device).train()


def _init_path(cfg: Config, init_dir: str, ckpt: Path | None) -> str:
    if ckpt is not None:
        saved = ckpt / CRITIC_DIR
        if not (saved / "config.json").is_file():
            raise ConfigError(
                f"{ckpt}: no {CRITIC_DIR}/ (a checkpoint of a run without a critic?), but "
                "loss.advantage = 'gae' resumes the critic from it"
            )
        return str(saved)
    init = cfg.critic.init
    if init == "policy":
        return init_dir
    if not (Path(init) / "config.json").is_file():
        raise ConfigError(
            f"critic.init = {init!r}: not a Hugging Face model folder (no config.json)"
        )
    return init


def _check_vocabulary(model, path: str, policy_dir: str) -> None:
    """The critic reads the policy's token ids: its embedding must cover the policy's
    vocabulary (a reward model of another base model would not)."""
    from transformers import AutoConfig

    want = AutoConfig.from_pretrained(policy_dir).vocab_size
    have = model.get_input_embeddings().weight.shape[0]
    if have != want:
        raise ConfigError(
            f"critic.init: {path} has a vocabulary of {have} tokens, the policy "
            f"({policy_dir}) {want}: the critic must share the policy's tokenizer"
        )


def load_critic(cfg: Config, init_dir: str, dist: DistInfo, ckpt: Path | None = None):
    """The critic (`Critic`) of a "gae" run, else None; weights from `ckpt`'s critic/ on a
    resume (its optimizer state: `Critic.load_optimizer`), else from `critic.init`."""
    if not uses_critic(cfg):
        return None
    from grpo_stream.learner.optim import build_optimizer

    path = _init_path(cfg, init_dir, ckpt)
    print0(f"[learn] loading the critic from {path} ...")
    load_to = torch.device("cpu") if dist.world_size > 1 else dist.device
    model = load_value_model(path, load_to)
    _check_vocabulary(model, path, init_dir)
    if cfg.learner.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if dist.world_size > 1:
        mp = mixed_precision_dtype(cfg.learner.dtype, dist.device)
        model = shard_model(model, dist, mp, wrapper=ShardedCritic)
    cc = cfg.critic
    own = {"lr": cc.lr, "weight_decay": cc.weight_decay, "warmup_steps": 0}
    opt, _ = build_optimizer(
        model, cfg.learner.model_copy(update=own | {"lr_schedule": "constant"})
    )
    return Critic(cfg, model, opt, dist)


class Critic:
    """The value model, its optimizer and one batch's V_old and returns (module docstring)."""

    def __init__(self, cfg: Config, model, optimizer, dist: DistInfo):
        self.cfg, self.model, self.opt, self.dist = cfg, model, optimizer, dist
        self.sharded = isinstance(model, ShardedPolicy)
        self.old_values: list[torch.Tensor] = []  # [B, T] per micro-batch of this batch
        self.returns: list[torch.Tensor] = []

    def values(self, mb: MicroBatch) -> torch.Tensor:
        if self.sharded:
            return self.model(mb)  # [B, T]; FSDP does precision
        with autocast(self.dist.device, self.cfg.learner.dtype):
            return token_values(self.model, mb)  # [B, T]

    def _batch_moments(self, mbs, named: dict[str, list]) -> dict[str, dict[str, float]]:
        """name -> `masked_moments` over every micro-batch (and, under FSDP, rank)."""
        sums: dict[str, float] = {}
        for name, xs in named.items():
            for mb, x in zip(mbs, xs, strict=True):
                for k, v in masked_moments(x, mb.mask).items():
                    sums[f"{name}.{k}"] = sums.get(f"{name}.{k}", 0.0) + v
        if is_distributed():  # one collective for all of them
            sums = all_reduce_scalars(sums, "sum")
        return {n: {k: sums[f"{n}.{k}"] for k in ("n", "sum", "sumsq")} for n in named}

    @torch.no_grad()
    def prepare(self, mbs: list[MicroBatch], ref: list) -> dict[str, float]:
        """V_old, GAE advantages (whitened over the batch when `critic.whiten`) and returns
        of each micro-batch; `mb.advantages` (each sequence's reward) becomes [B, T]."""
        cc, coef = self.cfg.critic, self.cfg.loss.kl_in_reward
        was_training = self.model.training
        self.model.eval()
        self.old_values = [self.values(mb) for mb in mbs]  # [B, T] each
        self.model.train(was_training)
        advs, self.returns = [], []
        for mb, v, r in zip(mbs, self.old_values, ref, strict=True):
            kl = None if r is None or coef == 0 else mb.behaviour_logprobs - r  # [B, T]
            rewards = token_rewards(mb.advantages, mb.mask, kl, coef)  # [B, T]
            adv, ret = gae(rewards, v, mb.mask, cc.gamma, cc.lam)  # [B, T] x2
            advs.append(adv)
            self.returns.append(ret)
        res = [r - v for r, v in zip(self.returns, self.old_values, strict=True)]  # R - V_old
        named = {"adv": advs, "ret": self.returns, "res": res, "v": self.old_values}
        mom = self._batch_moments(mbs, named)
        mean, std = moments_mean_std(mom["adv"])
        for mb, adv in zip(mbs, advs, strict=True):
            mb.advantages = masked_whiten(adv, mb.mask, mean, std) if cc.whiten else adv  # [B, T]
        size = self._batch_moments(mbs, {"abs": [mb.advantages.abs() for mb in mbs]})["abs"]
        out = {M.VALUE_MEAN: moments_mean_std(mom["v"])[0]}
        out[M.ADVANTAGE_ABS_MEAN] = moments_mean_std(size)[0]  # the tokens', not the rewards'
        out[M.RETURN_MEAN] = moments_mean_std(mom["ret"])[0]
        ev = explained_variance(mom["ret"], mom["res"])
        return out | ({M.EXPLAINED_VARIANCE: ev} if math.isfinite(ev) else {})  # NaN: R constant

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)

    def train_micro_batch(self, i: int, mb: MicroBatch, total_tokens: float) -> dict:
        """Backward of micro-batch i's value loss (its share of the batch's); its metrics."""
        v = self.values(mb)  # [B, T]
        loss, metrics = value_loss(v, self.old_values[i], self.returns[i], mb.mask,
                                   self.cfg.critic.value_clip, total_tokens=total_tokens)  # fmt: skip
        loss.backward()
        return metrics

    def step(self) -> float:
        """Clip the critic's gradient (`critic.max_grad_norm`), AdamW step; the norm."""
        params, limit = self.model.parameters(), self.cfg.critic.max_grad_norm
        if self.sharded:
            gn = clip_grad_norm(params, limit)
        else:
            gn = float(torch.nn.utils.clip_grad_norm_(params, limit))
        self.opt.step()
        return gn

    # ------------------------------------------------------------ checkpoints
    def gather(self) -> tuple[dict | None, dict]:
        """(full weights or None in one process, optimizer state): under FSDP a collective
        every rank calls, full states on rank 0."""
        from grpo_stream.learner.gather import gathered_state_dict

        weights = gathered_state_dict(self.model)
        opt = full_optimizer_state_dict_on_rank0(self.model, self.opt)
        return weights, opt

    def writer(self, with_optimizer: bool = True):
        """A function writing the critic into a checkpoint folder being built (rank 0):
        gathered now (collective under FSDP), written when the checkpoint is."""
        weights, opt = self.gather()
        fmt = "full_state_dict" if self.sharded else "torch"

        def write(folder: Path) -> None:
            out = Path(folder) / CRITIC_DIR
            unwrap(self.model).save_pretrained(out, safe_serialization=True, state_dict=weights)
            blob = {"optimizer": opt if with_optimizer else None, "format": fmt}
            torch.save(blob, out / OPTIMIZER_FILE)

        return write

    def load_optimizer(self, ckpt: Path) -> None:
        """Restore AdamW's state from `ckpt`'s critic/ (the format must match: one process
        or FSDP, as for the actor); a checkpoint without it leaves AdamW fresh."""
        path = Path(ckpt) / CRITIC_DIR / OPTIMIZER_FILE
        if not path.is_file():
            raise ConfigError(f"{path}: missing (the critic's optimizer state)")
        blob = torch.load(path, weights_only=False)
        want = "full_state_dict" if self.sharded else "torch"
        if blob["optimizer"] is None:
            print0(f"[learn] {path} holds no optimizer state: the critic's AdamW starts fresh")
        elif blob["format"] != want:
            raise ConfigError(f"{path}: optimizer state in format {blob['format']!r}, this "
                              f"learner needs {want!r}: resume with the same number of processes")  # fmt: skip
        elif self.sharded:
            load_full_optimizer_state(
                self.model, self.opt, blob["optimizer"] if self.dist.is_rank0 else {}
            )
        else:
            self.opt.load_state_dict(blob["optimizer"])
