"""The names of the learner's metrics, defined once.

Every key of a learner metrics row (`RUN/metrics.jsonl`, TensorBoard, the console line,
`replay`'s rows, the plot's panels) is a constant here, and the code that emits or reads
a metric uses the constant, never a bare string, so a renamed metric cannot leave a
reader behind. This module imports nothing, so every layer may use it (`algo` included).

    from grpo_stream.core import metric_names as M
    row[M.CLIP_FRAC] = row[M.CLIP_LOW_FRAC] + row[M.CLIP_HIGH_FRAC]

The generator's own metrics (`generator_metrics.jsonl`) are a separate record and are
not named here.
"""

from __future__ import annotations

# ---- rewards and advantages of the batch (algo.advantages, learner.step)
REWARD_MEAN = "reward_mean"
REWARD_STD = "reward_std"  # population std over the batch's samples
REWARD_MIN = "reward_min"
REWARD_MAX = "reward_max"
ZERO_VARIANCE_GROUPS = "zero_variance_groups"
ZERO_VARIANCE_FRAC = "zero_variance_frac"
KEPT_GROUPS = "kept_groups"
ADVANTAGE_ABS_MEAN = "advantage_abs_mean"

# ---- the critic of PPO (loss.advantage = "gae": algo.gae, learner.critic)
VALUE_LOSS = "value_loss"  # 0.5 * clipped squared error per token, over the micro-batches
VALUE_CLIP_FRAC = "value_clip_frac"  # tokens whose clipped value term was the larger
EXPLAINED_VARIANCE = "explained_variance"  # 1 - Var(R - V_old) / Var(R) over the batch
VALUE_MEAN = "value_mean"  # V_old per completion token, batch mean
RETURN_MEAN = "return_mean"  # the GAE value targets R, batch mean
CRITIC_GRAD_NORM = "critic_grad_norm"

# ---- the loss of a micro-batch (algo.loss, algo.policy, algo.corrections)
LOSS = "loss"
PG_LOSS = "pg_loss"
RATIO_MEAN = "ratio_mean"
RATIO_MIN = "ratio_min"
RATIO_MAX = "ratio_max"
BEHAVIOUR_WEIGHT_MEAN = "behaviour_weight_mean"
APPROX_KL_PROXIMAL = "approx_kl_proximal"  # KL(pi_old || pi_theta), k3
APPROX_KL_BEHAVIOUR = "approx_kl_behaviour"  # KL(pi_b || pi_old), k3
KL_REF = "kl_ref"  # KL(pi_theta || pi_ref), loss.kl_estimator; only when loss.beta > 0
ENTROPY = "entropy"
CLIP_LOW_FRAC = "clip_low_frac"
CLIP_HIGH_FRAC = "clip_high_frac"
DUAL_CLIP_FRAC = "dual_clip_frac"
TIS_TRUNCATED_FRAC = "tis_truncated_frac"
BEHAVIOUR_LOGPROB_ABS_DIFF = "behaviour_logprob_abs_diff"  # mean |log pi_old - log pi_b|
BEHAVIOUR_MASKED_FRAC = "behaviour_masked_frac"
NUM_TOKENS = "num_tokens"  # weights for averaging over micro-batches; not logged
NUM_SEQS = "num_seqs"  # in the row: sequences trained in the step (each once, not per epoch)

# ---- the optimizer steps of one learner step (learner.step)
GRAD_NORM = "grad_norm"
LR = "lr"
TOKENS = "tokens"  # prompt + completion tokens of the batch
COMPLETION_TOKENS = "completion_tokens"
PROXIMAL_S = "proximal_s"  # no-grad passes: pi_old (if not epoch 1's own), reference
TRAIN_S = "train_s"
TOKENS_PER_S = "tokens_per_s"  # TOKENS * epochs / TRAIN_S

# ---- the batch the step trained on (learner.step, learner.loop)
GROUPS = "groups"  # groups with a usable reward
SAMPLES = "samples"  # their samples
STALENESS_MEAN = "staleness_mean"  # learner version - sample version, over trained samples
STALENESS_MAX = "staleness_max"
STALE_GROUPS_DROPPED = "stale_groups_dropped"
REWARD_FAILED_GROUPS = "reward_failed_groups"
LINEAGE_GROUPS_DROPPED = "lineage_groups_dropped"  # stamped with another learner's lineage
AHEAD_GROUPS_DROPPED = "ahead_groups_dropped"  # sampled at a version ahead of the learner's
ZERO_VARIANCE_GROUPS_DROPPED = "zero_variance_groups_dropped"  # dynamic sampling's drops
CURSOR_START = "cursor_start"
CURSOR_END = "cursor_end"
WAIT_S = "wait_s"  # time spent waiting for (and reading) the batch

# ---- the rest of a learner step's time (learner.loop; the phases: grpo_stream.core.timing)
GATHER_S = "gather_s"  # full weights / optimizer state gathered for a sync or checkpoint
CHECKPOINT_S = "checkpoint_s"
EVAL_WAIT_S = "eval_wait_s"  # waiting for the held-out evaluation before a sync

# ---- the row as a whole
STEP = "step"
POLICY_VERSION = "policy_version"  # after this step (and its sync, if one was due)
STEP_S = "step_s"
KL = "kl"  # KL_REF when beta > 0, else APPROX_KL_PROXIMAL
CLIP_FRAC = "clip_frac"  # CLIP_LOW_FRAC + CLIP_HIGH_FRAC
PEAK_MEMORY_MB = "peak_memory_mb"  # learner process: CUDA max allocated, else peak RSS


# ---- per epoch index e = 1..mu of a learner step (learner.step), so the mu effect shows in
# every run: with learner.minibatches_per_epoch = 1, epoch 1 runs before any update of
# this batch (ratio 1, clip fraction exactly 0)
EPOCH_SEP = "/epoch"


def clip_frac_epoch(epoch: int) -> str:
    """`clip_frac/epochE`: CLIP_FRAC over the tokens of epoch `epoch` (1-based)."""
    return f"{CLIP_FRAC}{EPOCH_SEP}{epoch}"


def approx_kl_epoch(epoch: int) -> str:
    """`approx_kl_proximal/epochE`: APPROX_KL_PROXIMAL over epoch `epoch` (1-based)."""
    return f"{APPROX_KL_PROXIMAL}{EPOCH_SEP}{epoch}"


# ---- weight sync (sync.disk, sync.nccl), only in the learner's rows
SYNC_S = "sync_s"
SYNC_SAVE_S = "sync_save_s"
SYNC_PAUSE_S = "sync_pause_s"
SYNC_CONNECT_S = "sync_connect_s"
SYNC_TRANSFER_S = "sync_transfer_s"
SYNC_PAUSES = "sync_pauses"  # [[url, paused_at, resumed_at], ...] wall-clock seconds
# sync.background: the background thread's own seconds for the push(es) and checkpoint(s)
# joined at this step's end (the previous step's, and the last step's own); the learner's
# waits for them are SYNC_S, EVAL_WAIT_S and CHECKPOINT_S
SYNC_BG_S = "sync_bg_s"
EVAL_WAIT_BG_S = "eval_wait_bg_s"
CHECKPOINT_BG_S = "checkpoint_bg_s"
SYNC_BYTES = "sync_bytes"  # bytes written for one push (sync.lora: the adapter's files)

# wall-clock measurements: the only keys in which a replayed row may differ from the
# learner's row for the same step
WALL_CLOCK = (WAIT_S, PROXIMAL_S, TRAIN_S, TOKENS_PER_S, STEP_S)
# written only by the learner process (it alone talks to the servers; its peak memory)
LEARNER_ONLY = (SYNC_S, SYNC_SAVE_S, SYNC_PAUSE_S, SYNC_CONNECT_S, SYNC_TRANSFER_S, PEAK_MEMORY_MB,
                SYNC_PAUSES, SYNC_BYTES, GATHER_S, CHECKPOINT_S, EVAL_WAIT_S, SYNC_BG_S,
                EVAL_WAIT_BG_S, CHECKPOINT_BG_S,
                LINEAGE_GROUPS_DROPPED, AHEAD_GROUPS_DROPPED,
                ZERO_VARIANCE_GROUPS_DROPPED)  # fmt: skip
