"""Data-parallel learner on FSDP2 (`torch.distributed.fsdp.fully_shard`), started by torchrun.

    torchrun --nproc-per-node N -m grpo_stream.cli learn ...

    dist = init_distributed(cfg.learner.device)    # no-op single process without torchrun
    policy = shard_model(hf_model, dist, mixed_precision_dtype(cfg.learner.dtype, dist.device))
    opt, sched = build_optimizer(policy, cfg.learner)          # AFTER sharding (DTensor params)
    samples, advs = shard_batch(samples, advs, dist.rank, dist.world_size)
    lp, ent = policy(mb, temperature, chunk_size, with_entropy)  # == sequence_logprobs(hf, mb, ...)

Sharding. `shard_model` applies `fully_shard` to every decoder layer, then wraps the
Hugging Face model in `ShardedPolicy` and makes that wrapper the FSDP root, which holds the
embedding, final norm and `lm_head`. The wrapper exists because `policy.sequence_logprobs`
calls `model.base_model(...)` and reads `lm_head.weight` directly: neither goes through the
HF model's own `forward`, so if the HF model were the root its all-gather hooks would never
fire and `lm_head.weight` would still be a shard. The wrapper's `forward` *is*
`sequence_logprobs`, so the root's hooks gather embed/norm/lm_head around it. Parameter
names of the wrapper carry a `module.` prefix; `unwrap(policy)` is the HF model, whose
`named_parameters()` are the Hugging Face names (the sync transports want those).

Gradient scaling (worked out). Let rank r hold tokens S_r, with the batch-global token count
N = Σ_r |S_r| (from `all_reduce_scalars`). grpo_loss gives rank r the loss
L_r = Σ_{t∈S_r} ℓ_t / N, so Σ_r L_r = L, the single-process loss of the whole batch, and
Σ_r ∇L_r = ∇L. FSDP2's reduce-scatter AVERAGES by default, which would give ∇L / W. So
`shard_model` sets the gradient divide factor to 1 (`set_gradient_divide_factor(1.0)`, with
sum-only collectives so gloo works too): the reduced gradient is the SUM Σ_r ∇L_r = ∇L,
exactly the single-process gradient; no loss scaling is needed. (Equivalently one could keep
FSDP's average and multiply each rank's loss by W.) The same holds for total_seqs
(sequence-mean aggregation) and for the Dr. GRPO constant mode: pass global sums.

Equal work per rank. Every FSDP forward/backward is a collective, so every rank must run
the same number of micro-batches. `shard_samples` deals samples round-robin (rank r gets
samples r, r+W, r+2W, ...) and pads ranks that come up one short with a *padding sample*: a
copy of a real sample cut to two prompt tokens with no completion. It has no
completion tokens (mask all zero), so it adds 0 to the loss, the gradient and total_tokens;
it must not be counted in total_seqs (`count_real`). Nothing is dropped, so the gradient
equals the single-process one for all three aggregations.

What the lead must change to use this (call sites; nothing here edits them):
 learner/loop.py, `Learner.__init__`:
  1. first thing: `self.dist = init_distributed(cfg.learner.device)`; use `self.dist.device`
     instead of `pick_device(...)`; seed identically on all ranks (already: run.seed).
  2. after `load_causal_lm(...)` (every rank loads the full model, on CPU or its device) and
     after `gradient_checkpointing_enable()`: `self.model = shard_model(model, self.dist,
     mixed_precision_dtype(cfg.learner.dtype, self.dist.device))`; same for `self.ref` when
     β > 0 (frozen params shard fine).
  3. `build_optimizer(self.model, ...)` must come AFTER shard_model (it must see the DTensor
     parameters). `load_trainer_state` on resume: the optimizer state is sharded, so load it
     with `load_full_optimizer_state(self.model, opt, full_sd)` instead of
     `opt.load_state_dict`, and save it with `full_optimizer_state_dict_on_rank0`.
  4. `make_sync`: DiskSync only on rank 0 (`None` elsewhere, but see 6); NCCLSync on every
     rank (it reads the rank itself; only rank 0 talks to the servers).
  5. `MetricsWriter`, `trained_batches.jsonl`, `write_progress`: rank 0 only.
 learner/loop.py, `Learner._next_batch`: rank 0 reads the cursor; `broadcast_object((groups,
     info))` to the others (tail-following reads may differ in time across ranks, and a
     time-out on one rank only would deadlock the collectives). Keep `self.cursor` advanced
     on rank 0 only (it is only saved from rank 0).
 learner/loop.py, `Learner.train_one`: after `batch_advantages`, `samples, advs =
     shard_batch(samples, advs, rank, world)`; `rewards`/`staleness` metrics from the
     unsharded lists (rank 0 has them).
 learner/loop.py, `Learner._after_step`: every rank calls `full_state_dict_on_rank0(model)`
     (a collective) before a checkpoint or a disk sync; rank 0 then writes
     `unwrap(model).save_pretrained(dir, state_dict=sd)` (checkpoint.save_checkpoint and
     sync.disk.save_weights call `model.save_pretrained(...)` without state_dict: give them a
     `state_dict=` parameter; verified: `save_pretrained(dir, state_dict=sd)` of the sharded
     HF model writes the right weights). NCCLSync.push(model, version) is called on EVERY
     rank (its gathers are collectives). `self.version`/`self.step` advance identically on
     every rank, so nothing else needs broadcasting.
 learner/step.py, `StepRunner._logprobs`: call `self.model(mb, self.temperature,
     chunk_size, entropy)` when it is a `ShardedPolicy` (its forward is sequence_logprobs);
     skip `autocast` there when FSDP mixed precision is on (the params are already bf16).
 learner/step.py, `StepRunner._optimizer_step`: total_tokens and total_seqs become
     `all_reduce_scalars({"tokens": local_tokens, "seqs": count_real(local)})` (global sums);
     every rank must call backward on every micro-batch, even an all-padding one;
     `clip_grad_norm_` → `clip_grad_norm(self.model.parameters(), max_norm)` from here (the
     norm of DTensor grads is a DTensor); optionally `set_requires_gradient_sync(False)` on
     all but the last micro-batch to reduce-scatter once per optimizer step.
 learner/step.py, `StepRunner.run`: `MetricMean` sums and weights, `tokens`,
     `completion_tokens` through `all_reduce_scalars` before dividing, so the logged metrics
     are global. `random.sample` may differ across ranks: fine, only the number of
     micro-batches per optimizer step must match, and it does (equal sequences per rank).
     With `minibatches_per_epoch > 1` the mini-batches are a different (equally unbiased)
     partition than in one process.
"""

from __future__ import annotations

import dataclasses
import os
import zlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from grpo_stream.learner.policy import sequence_logprobs, sequence_loss

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_rank0() -> bool:
    return not is_distributed() or dist.get_rank() == 0


def _env_int(name: str) -> int:
    raw = os.environ.get(name)
    if raw is None:
        raise RuntimeError(f"${name} is not set: start the learner with torchrun")
    try:
        return int(raw)
    except ValueError:
        raise RuntimeError(f"${name} = {raw!r}: expected an integer (set by torchrun)") from None


def _device(requested: str, local_rank: int) -> torch.device:
    if requested == "cpu" or not torch.cuda.is_available():
        if requested.startswith("cuda"):
            raise ValueError(f"learner.device = {requested!r} but no CUDA device is available")
        return torch.device("cpu")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_distributed(device: str = "auto") -> DistInfo:
    """Join torchrun's process group (nccl on CUDA, gloo on CPU); idempotent.

    Without $WORLD_SIZE (no torchrun) this is a no-op: rank 0 of 1, device from `device`.
    """
    if "WORLD_SIZE" not in os.environ:
        from grpo_stream.learner.policy import pick_device

        return DistInfo(0, 1, 0, pick_device(device))
    rank, world, local = (_env_int(n) for n in _ENV)
    dev = _device(device, local)
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kw = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend, rank=rank, world_size=world, **kw)
    return DistInfo(rank, world, local, dev)


def shutdown_distributed() -> None:
    """Leave the process group cleanly (a barrier, then destroy): a rank that exits while
    its peer still tears down gloo can take the peer down with SIGABRT."""
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()


def mixed_precision_dtype(learner_dtype: str, device: torch.device) -> torch.dtype | None:
    """bf16 FSDP parameters on GPU when learner.dtype == "bfloat16"; None (fp32) otherwise."""
    return torch.bfloat16 if learner_dtype == "bfloat16" and device.type == "cuda" else None


class ShardedPolicy(torch.nn.Module):
    """FSDP root around a Hugging Face causal LM; forward = `sequence_logprobs`, or
    `sequence_loss` when given a `loss_fn`."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(
        self, mb, temperature: float, chunk_size: int, with_entropy: bool = False, loss_fn=None
    ):
        # ([B, T] log-probs, [B, T] entropy or None), or (loss, log-probs, entropy); the
        # root hooks have gathered embed/norm/lm_head, the per-layer hooks each decoder layer
        if loss_fn is not None:
            return sequence_loss(self.module, mb, temperature, chunk_size, loss_fn, with_entropy)
        return sequence_logprobs(self.module, mb, temperature, chunk_size, with_entropy)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model inside a `ShardedPolicy` (or `model` itself)."""
    return model.module if isinstance(model, ShardedPolicy) else model


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    layers = getattr(getattr(model, "base_model", model), "layers", None)
    if layers is None:
        raise ValueError(
            f"{type(model).__name__}: no base_model.layers to shard (expected a decoder LM)"
        )
    return list(layers)


def shard_model(model, dist_info: DistInfo, mp_dtype: torch.dtype | None = None) -> ShardedPolicy:
    """fully_shard each decoder layer, then the `ShardedPolicy` root (see module docstring)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not is_distributed():
        raise RuntimeError(
            "shard_model needs a process group: call init_distributed() under torchrun"
        )
    model.to(dist_info.device)
    mp = MixedPrecisionPolicy(
        param_dtype=mp_dtype, reduce_dtype=torch.float32 if mp_dtype else None
    )
    sharded = []
    for layer in _decoder_layers(model):
        sharded.append(fully_shard(layer, mp_policy=mp))
    root = fully_shard(ShardedPolicy(model), mp_policy=mp)
    for m in [*sharded, root]:
        # reduce-scatter SUMS: each rank's loss already carries the global normaliser
        m.set_gradient_divide_factor(1.0)
        m.set_force_sum_reduction_for_comms(True)
    return root


def shard_indices(n: int, rank: int, world: int) -> list[int | None]:
    """Rank `rank`'s sample indices: rank, rank+W, ...; None pads to ceil(n / W)."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} / world size {world}: need 0 <= rank < world")
    per_rank = -(-n // world)  # ceil
    mine: list[int | None] = list(range(rank, n, world))
    return mine + [None] * (per_rank - len(mine))


def padding_sample(like):
    """A zero-token filler: `like`'s first two tokens as prompt, no completion (mask all 0).

    Two tokens, not one: a micro-batch holding only padding then still has T = 1 target
    column (a [B, 0] batch breaks grpo_loss's metrics).
    """
    head = (list(like.prompt_ids) + list(like.completion_ids))[:2]
    return dataclasses.replace(
        like,
        prompt_ids=head,
        completion_ids=[],
        behaviour_logprobs=[],
        row_id=-1,
        group_id=-1,
        sample_index=-1,
    )


def is_padding(sample) -> bool:
    return sample.sample_index == -1 and not sample.completion_ids


def count_real(samples) -> int:
    """Sequences that count in total_seqs (padding excluded)."""
    return sum(not is_padding(s) for s in samples)


def shard_samples(samples: list, rank: int, world: int) -> list:
    """This rank's share; every rank gets ceil(n / W) sequences, the short ones padded."""
    if not samples:
        raise ValueError("shard_samples: no samples to shard")
    return [
        samples[i] if i is not None else padding_sample(samples[0])
        for i in shard_indices(len(samples), rank, world)
    ]


def shard_batch(samples: list, advantages: list[float], rank: int, world: int):
    """`shard_samples` with the advantages kept aligned (0.0 for padding)."""
    if len(samples) != len(advantages):
        raise ValueError(f"{len(samples)} samples but {len(advantages)} advantages")
    idx = shard_indices(len(samples), rank, world)
    return shard_samples(samples, rank, world), [0.0 if i is None else advantages[i] for i in idx]


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_scalars(values: dict[str, float], op: str = "sum") -> dict[str, float]:
    """Reduce named floats over all ranks (sum | max | min | mean), one collective.

    Every rank must pass the same keys (checked: a mismatch would silently add unrelated
    numbers). Single process: returned unchanged (as floats).
    """
    if op not in (*_OPS, "mean"):
        raise ValueError(f"all_reduce_scalars: op {op!r} not in sum|max|min|mean")
    names = sorted(values)
    if not is_distributed():
        return {k: float(values[k]) for k in names}
    dev = _comm_device()
    key = float(zlib.crc32("\0".join(names).encode()))
    check = torch.tensor([key, -key], dtype=torch.float64, device=dev)  # [2]
    dist.all_reduce(check, op=dist.ReduceOp.MAX)
    if check[0].item() != key or -check[1].item() != key:
        raise RuntimeError(f"all_reduce_scalars: ranks passed different keys (this rank: {names})")
    buf = torch.tensor([float(values[k]) for k in names], dtype=torch.float64, device=dev)  # [K]
    dist.all_reduce(buf, op=_OPS["sum" if op == "mean" else op])
    if op == "mean":
        buf /= dist.get_world_size()
    return dict(zip(names, buf.tolist(), strict=True))


def broadcast_object(obj=None, src: int = 0):
    """Rank `src`'s picklable `obj` on every rank (identity in a single process)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_comm_device())
    return box[0]


def clip_grad_norm(parameters, max_norm: float) -> float:
    """clip_grad_norm_ that also returns a plain float for DTensor (FSDP2) gradients."""
    norm = torch.nn.utils.clip_grad_norm_(list(parameters), max_norm)
    full = getattr(norm, "full_tensor", None)
    return float(full() if callable(full) else norm)


def full_state_dict_on_rank0(model) -> dict[str, torch.Tensor]:
    """Full CPU state dict under Hugging Face names on rank 0, {} elsewhere. Collective.

    Single process: the plain state dict of the (unwrapped) model.
    """
    inner = unwrap(model)
    if not is_distributed():
        return {k: v.detach().cpu() for k, v in inner.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(inner, options=opts)


def full_optimizer_state_dict_on_rank0(model, optimizer) -> dict:
    """Full optimizer state (keyed by parameter FQN) on rank 0, {} elsewhere. Collective."""
    if not is_distributed():
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, optimizer, options=opts)


def load_full_optimizer_state(model, optimizer, state: dict) -> None:
    """Inverse of `full_optimizer_state_dict_on_rank0` (rank 0's `state` is broadcast)."""
    if not is_distributed():
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_optimizer_state_dict(model, optimizer, state, options=opts)
