"""Data-parallel learner on FSDP2 (`torch.distributed.fsdp.fully_shard`), started by torchrun.

    torchrun --nproc-per-node N -m grpo_stream.cli learn ...

Every helper here is a no-op (or the plain single-process operation) without torchrun,
so the learner's code reads the same in one process and in N:

    dist = init_distributed(cfg.learner.device)     # rank 0 of 1 without $WORLD_SIZE
    policy = shard_model(hf_model, dist, mp_dtype)  # only under torchrun; then build_optimizer
    samples, advs = shard_batch(samples, advs, rank, world)
    batch = broadcast_object(batch_on_rank0)        # identity in one process
    print0("[learn] ...")                           # rank 0 alone prints

The state dicts gathered from the shards (checkpoints, disk sync) are `learner.gather`'s.

Sharding: `shard_model` shards every decoder layer, then wraps the Hugging Face model in
`ShardedPolicy` and makes that wrapper the FSDP root (embedding, final norm, lm_head).
The wrapper's `forward` is `sequence_logprobs` / `sequence_loss`, which read
`lm_head.weight` directly, so the root's hooks gather it; `unwrap(policy)` is the HF model.

Gradients: grpo_loss divides each rank's loss by the batch-global token (or sequence)
count, so the ranks' losses sum to the single-process loss; `shard_model` therefore makes
the reduce-scatter SUM (divide factor 1), and the reduced gradient equals the
single-process gradient.

Sharding: `shard_groups` deals whole groups (the samples with one prompt), so each
prompt is encoded on one rank only (the shared-prefix forward's saving stays whole),
balanced by tokens: largest group first, each to the rank with the fewest tokens so
far. `shard_samples` pads short ranks to the same number of samples with zero-token
`padding_sample`s, which add nothing to the loss, the gradient or the normalisers
(`count_real` leaves them out of total_seqs). Every FSDP forward and backward is a
collective, so every rank runs the same number of micro-batches: `learner.plan` leaves
padding samples out of its micro-batches, and a rank with fewer than another cuts its
micro-batches at group boundaries, then adds padding micro-batches (never a group).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import zlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from grpo_stream.learner.policy import sequence_logprobs, sequence_loss
from grpo_stream.learner.split import units

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


def print0(msg: str) -> None:
    """Print a progress line to stderr, on rank 0 only (every process prints alone)."""
    if is_rank0():
        print(msg, file=sys.stderr, flush=True)


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


def current_cuda_device(dev: torch.device) -> torch.device:
    """Make a CUDA `dev` this thread's current device, its index explicit ("cuda" ->
    "cuda:<current>"); CPU devices pass through. vLLM's NCCL endpoint and every tensor
    made without a device index land on the current device, which is 0 unless set."""
    if dev.type != "cuda":
        return dev
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        from grpo_stream.config import ConfigError

        raise ConfigError(
            f"learner.device = {str(dev)!r}: {torch.cuda.device_count()} CUDA device(s) "
            "visible to the learner (ids count from 0 within its CUDA_VISIBLE_DEVICES)"
        )
    dev = dev if dev.index is not None else torch.device("cuda", torch.cuda.current_device())
    torch.cuda.set_device(dev)
    return dev


def init_distributed(device: str = "auto") -> DistInfo:
    """Join torchrun's process group (nccl on CUDA, gloo on CPU); idempotent.

    Without $WORLD_SIZE (no torchrun) this is a no-op: rank 0 of 1, device from `device`.
    """
    if "WORLD_SIZE" not in os.environ:
        from grpo_stream.learner.policy import pick_device

        return DistInfo(0, 1, 0, current_cuda_device(pick_device(device)))
    rank, world, local = (_env_int(n) for n in _ENV)
    dev = _device(device, local)
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kw = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend, rank=rank, world_size=world, **kw)
    return DistInfo(rank, world, local, dev)


def shutdown_distributed(code: int = 0) -> int:
    """Leave the process group cleanly (a barrier, then destroy) and, under torchrun, end
    the process here with `code`: `code` back in a single process.

    A rank that exits while its peer still tears down gloo can take the peer down with
    SIGABRT, hence the barrier. And `destroy_process_group` does not free the gloo objects
    that FSDP modules still reference: the interpreter's own teardown frees them later and
    can abort ("terminate called without an active exception", seen once in CI, rank 1
    of a 2-process run; pytorch/pytorch#179291). So a rank flushes its output and leaves with
    `os._exit` after a clean destroy, skipping that teardown (everything of ours is closed).
    """
    if not is_distributed():
        return code
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


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


def shard_model(
    model, dist_info: DistInfo, mp_dtype: torch.dtype | None = None, wrapper=ShardedPolicy
) -> ShardedPolicy:
    """fully_shard each decoder layer, then the `wrapper` root (see module docstring; the
    critic's root is `learner.critic.ShardedCritic`)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not is_distributed():
        raise RuntimeError(
            "shard_model needs a process group: call init_distributed() under torchrun"
        )
    # no model.to(device) first: each fully_shard call moves ITS parameters to the device
    # and keeps only this rank's shard, so a model loaded on CPU never sits whole on a GPU
    mp = MixedPrecisionPolicy(
        param_dtype=mp_dtype, reduce_dtype=torch.float32 if mp_dtype else None
    )
    sharded = []
    for layer in _decoder_layers(model):
        sharded.append(fully_shard(layer, mp_policy=mp))
    root = fully_shard(wrapper(model), mp_policy=mp)
    for m in [*sharded, root]:
        # reduce-scatter SUMS: each rank's loss already carries the global normaliser
        m.set_gradient_divide_factor(1.0)
        m.set_force_sum_reduction_for_comms(True)
    return root


def _check_rank(rank: int, world: int) -> None:
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} / world size {world}: need 0 <= rank < world")


def group_tokens(samples: list, group: list[int]) -> int:
    """A group's tokens as the shared-prefix forward runs them: its prompt once, then every
    completion (the balance `shard_groups` keeps)."""
    return len(samples[group[0]].prompt_ids) + sum(len(samples[i].completion_ids) for i in group)


def shard_groups(samples: list, world: int) -> list[list[int]]:
    """Each rank's sample indices, in batch order: whole groups (`split.units`), the
    largest first (`group_tokens`; ties in batch order) to the rank with the fewest
    tokens so far (ties: the lower rank)."""
    _check_rank(0, world)
    groups = units(samples, list(range(len(samples))), shared=True)
    tokens = [group_tokens(samples, g) for g in groups]
    load, shares = [0] * world, [[] for _ in range(world)]
    for g in sorted(range(len(groups)), key=lambda g: -tokens[g]):  # stable
        r = min(range(world), key=lambda r: (load[r], r))
        load[r] += tokens[g]
        shares[r].extend(groups[g])
    return [sorted(share) for share in shares]


def shard_indices(samples: list, rank: int, world: int) -> list[int | None]:
    """Rank `rank`'s sample indices (`shard_groups`); None pads it to the most any rank
    holds, so every rank has as many samples (at least one)."""
    _check_rank(rank, world)
    shares = shard_groups(samples, world)
    most = max(1, max(len(s) for s in shares))
    mine: list[int | None] = list(shares[rank])
    return mine + [None] * (most - len(mine))


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
    """This rank's share (`shard_indices`): whole groups, short ranks padded."""
    if not samples:
        raise ValueError("shard_samples: no samples to shard")
    return [
        samples[i] if i is not None else padding_sample(samples[0])
        for i in shard_indices(samples, rank, world)
    ]


def shard_batch(samples: list, advantages: list[float], rank: int, world: int):
    """`shard_samples` with the advantages kept aligned (0.0 for padding)."""
    if len(samples) != len(advantages):
        raise ValueError(f"{len(samples)} samples but {len(advantages)} advantages")
    idx = shard_indices(samples, rank, world)
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
