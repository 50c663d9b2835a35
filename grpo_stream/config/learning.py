"""The learner's config sections: `loss`, `learner`, `sync`, every field described.

Kept apart from `sections.py` only to keep files small; `grpo_stream.config` gathers
both into `Config` and re-exports every section (import them from there). The `loss`
string fields are registry keys in `grpo_stream.algo` (one function per variant); the
Literal choices make a bad name fail at load, and a unit test keeps them equal to the
registry tables.

    from grpo_stream.config import LearnerConfig
    LearnerConfig.model_fields["epochs"].description
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from grpo_stream.config.sections import _Section


class LossConfig(_Section):
    policy_loss: Literal["ppo_clip", "gspo"] = Field(
        "ppo_clip",
        description="ppo_clip: per-token ratio pi_theta/pi_old; gspo: the sequence's "
        "geometric-mean ratio (needs aggregation = seq_mean_token_mean)",
    )
    epsilon_low: float = Field(0.2, ge=0, description="clip the ratio below at 1 - epsilon_low")
    epsilon_high: float = Field(
        0.2, ge=0, description="clip the ratio above at 1 + epsilon_high (clip-higher, DAPO)"
    )
    dual_clip_c: float | None = Field(
        None, gt=1, description="dual clip (ratio factor): where A < 0 the objective >= c*A"
    )
    behaviour_correction: Literal["tis", "mask", "none"] = Field(
        "tis",
        description="correct for behaviour (vLLM) != proximal (learner at batch start): "
        "truncated weights (tis), a mask (mask), or none",
    )
    tis_cap: float = Field(
        2.0, gt=0, description="tis only: token weight min(pi_old/pi_b, tis_cap) (ratio)"
    )
    mask_low: float = Field(
        0.5, description="mask only: drop tokens with pi_old/pi_b below this (ratio)"
    )
    mask_high: float = Field(
        2.0, description="mask only: drop tokens with pi_old/pi_b above this (ratio)"
    )
    aggregation: Literal["token_mean", "seq_mean_token_mean", "constant"] = Field(
        "token_mean",
        description="token_mean: over all tokens (DAPO); seq_mean_token_mean: per "
        "sequence, then over sequences (GRPO paper); constant: sum / constant (Dr. GRPO)",
    )
    constant_normalizer: float | None = Field(
        None,
        gt=0,
        description="constant only: the divisor per sequence (tokens); unset: generator.max_tokens",
    )
    kl_estimator: Literal["k1", "k2", "k3"] = Field(
        "k3", description="estimator of KL(pi_theta || pi_ref) in the loss (used when beta > 0)"
    )
    beta: float = Field(0.0, ge=0, description="KL penalty weight; 0 loads no reference model")
    advantage: Literal["group", "batch_std", "leave_one_out", "batch", "gae"] = Field(
        "group",
        description="baseline and spread: the group's mean/std, the group's mean with the "
        "batch's std, the mean of the other G-1 samples, the batch's mean/std "
        "(REINFORCE++), or gae: PPO with a critic (the [critic] section), per-token GAE",
    )
    kl_in_reward: float = Field(
        0.0,
        ge=0,
        description="gae only: classic PPO's KL penalty in the reward, each completion "
        "token charged this x (log pi_b - log pi_ref), pi_b the sampling policy (vLLM's "
        "log-probs; loads the reference model); 0: none",
    )
    scale_std: bool = Field(True, description="divide advantages by the std (False: Dr. GRPO)")
    advantage_eps: float = Field(
        1e-6, gt=0, description="advantage = (r - baseline) / (std + advantage_eps)"
    )
    drop_zero_variance: bool = Field(
        False, description="drop groups whose rewards are all equal (DAPO dynamic sampling)"
    )


class LearnerConfig(_Section):
    device: str = Field(
        "auto", description='"auto" (CUDA if present), "cpu", "cuda" or "cuda:N" (GPU N)'
    )
    gpus: list[int] | None = Field(
        None,
        description="GPU ids the learner runs on under `run` (its CUDA_VISIBLE_DEVICES), "
        "one per learner.num_processes; unset: from learner.device (cuda:N: [N], else "
        "0..num_processes-1)",
    )
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="learner compute dtype (bfloat16: FSDP2 mixed precision)"
    )
    batch_groups: int = Field(8, ge=1, description="groups (prompts) per learner step")
    dynamic_sampling: bool = Field(
        False,
        description="DAPO dynamic sampling: drop groups whose rewards are all equal (no "
        "gradient under GRPO; 'zero_variance' in the ledger) and read on, the generator "
        "refilling, until the batch holds batch_groups groups with reward variance",
    )
    max_refill_batches: int = Field(
        4,
        ge=1,
        description="dynamic sampling reads at most this many times batch_groups groups "
        "for one step: at the bound it trains on the groups with variance it found, and "
        "stops with an error when it found none",
    )
    micro_batch_size: int = Field(
        16,
        ge=1,
        description="at most this many sequences per forward pass; shared prefix: a "
        "group larger than this runs in parts, its prompt once in each",
    )
    micro_batch_tokens: int | None = Field(
        None,
        ge=1,
        description="pack micro-batches by length to at most this many forward tokens in "
        "the layout that runs (padded rows, packed group rows, or KV-cache prompt + "
        "completion rows), padding counted; a group over it runs in parts, a single "
        "sequence over it alone (replaces micro_batch_size); unset: micro_batch_size",
    )
    shared_prefix: Literal["auto"] | bool = Field(
        "auto",
        description="run each group's prompt once and its completions against it "
        "(same numbers, less work); auto: when that skips enough tokens; false: padded",
    )
    pack_mask_mib: float = Field(
        64.0,
        ge=0,
        description="shared prefix: one forward of each micro-batch's groups packed into "
        "rows (prompt, then every completion) while their grouped attention mask, "
        "groups x row length^2 elements of 1 byte (sdpa) or 4 (eager, float32), stays "
        "under this (MiB); longer rows, or 0: the prompt's KV cache and completion_passes",
    )
    completion_passes: int = Field(
        4,
        ge=1,
        description="shared prefix on the KV cache, one process: run a micro-batch's "
        "completions in at most "
        "this many passes of similar length, each as wide as its longest (count; 1: one "
        "pass padded to the longest; under FSDP always 1)",
    )
    epochs: int = Field(2, ge=1, description="mu: passes over each batch per learner step")
    minibatches_per_epoch: int = Field(
        1, ge=1, description="optimizer steps per epoch (the batch split this many ways)"
    )
    lr: float = Field(1e-5, gt=0, description="AdamW learning rate (peak)")
    weight_decay: float = Field(0.0, description="AdamW weight decay")
    betas: tuple[float, float] = Field((0.9, 0.99), description="AdamW (beta1, beta2)")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up (optimizer steps)")
    lr_schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="learning rate after warm-up, over all optimizer steps"
    )
    max_grad_norm: float = Field(1.0, gt=0, description="clip the gradient's global L2 norm")
    max_steps: int = Field(10, ge=1, description="learner steps (batches) to train, then stop")
    max_wall_s: float | None = Field(
        None,
        gt=0,
        description="also stop after this much training wall time (seconds, from the first "
        "step's wait; model loading excluded), the step that crosses it checkpointed; unset: "
        "max_steps only",
    )
    max_staleness: int = Field(
        2, ge=0, description="drop groups more than this many policy versions old"
    )
    checkpoint_every: int = Field(
        5,
        ge=0,
        description="checkpoint every N learner steps for --resume (0: only at the end); "
        "learner.keep_checkpoints of them are kept",
    )
    keep_checkpoints: int = Field(
        1,
        ge=1,
        description="newest whole checkpoints kept (count); --resume uses the newest, an "
        "older one only if the newest is damaged (each ~3x the fp32 weights with AdamW)",
    )
    keep_final_optimizer: bool = Field(
        True,
        description="keep AdamW's state (2x the fp32 weights) in the checkpoint of step "
        "learner.max_steps; false: that one holds the weights, scheduler, RNG and cursor, "
        "and a --resume with more steps starts AdamW's moments from zero (and says so)",
    )
    logprob_chunk_size: int = Field(
        1024, ge=1, description="positions per chunk of the vocabulary projection (tokens)"
    )
    fused_loss: bool = Field(
        True,
        description="make gradients while each chunk's softmax is in hand (3 vocab-sized "
        "matmuls); false: log-probs first, recompute in backward (4)",
    )
    wait_timeout_s: float = Field(
        600.0, gt=0, description="max wait for enough groups in the buffer (seconds)"
    )
    stall_timeout_s: float = Field(
        900.0,
        gt=0,
        description="`run` reports a learner whose published progress has not moved for "
        "this long (seconds)",
    )
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in backward (less memory, slower)"
    )
    num_processes: int = Field(
        1,
        ge=1,
        description="learner processes `run` starts under torchrun (FSDP2 data parallel, "
        "one per GPU or gloo on CPU); 1: a plain process",
    )
    num_threads: int | None = Field(
        None,
        description="torch CPU threads (per process); unset: every core, split across ranks",
    )
    malloc_mmap_threshold_kib: int | None = Field(
        None,
        ge=1,
        le=32768,
        description="glibc's mmap threshold for the learner process (KiB): blocks above "
        "it are unmapped when freed, so the peak RSS follows the live tensors (a slower "
        "step: fresh pages); unset: glibc's own threshold, which rises as blocks are "
        "freed and leaves freed activations in the heap",
    )


class SyncConfig(_Section):
    transport: Literal["disk", "nccl", "lora", "none"] = Field(
        "disk",
        description="disk: safetensors folder + reload_weights; nccl: vLLM's NCCL weight "
        "transfer (GPU); lora: the LoRA adapter alone, loaded as policy-vN ([lora]); "
        "none: no sync (servers keep the initial weights)",
    )
    every: int = Field(1, ge=1, description="push weights every N learner steps")
    pause_mode: Literal["wait", "keep", "abort"] = Field(
        "wait",
        description="vLLM /pause mode during a sync: wait (drain), keep (freeze, then "
        "continue on new weights), abort (cut, partial outputs)",
    )
    mode: Literal["all", "rolling"] = Field(
        "all",
        description="disk: all = pause and reload every server at once; rolling = one "
        "server at a time, the others keep serving (the generator sends them the work); "
        "nccl always syncs all at once",
    )
    keep_last: int = Field(
        1,
        ge=1,
        description="disk: newest weight folders kept (count); an older one a restarted "
        "server is still loading from is kept until the next push",
    )
    timeout_s: float = Field(
        120.0,
        gt=0,
        description="limit for one sync of one server (pause, reload or transfer, version, "
        "resume; seconds; nccl syncs all servers together, within one such limit): past it "
        "the sync fails naming the server, and `run` restarts it",
    )
    background: bool = Field(
        True,
        description="disk or none transport in one learner process: each step's push and "
        "checkpoint are written from a copy of its weights by one background thread while "
        "the next step trains (the learner waits only at the next push); false, or under "
        "nccl or torchrun: the learner waits for them after every step",
    )
