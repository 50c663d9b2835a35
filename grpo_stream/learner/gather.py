"""Full state dicts gathered from FSDP2 shards: what checkpoints and weight syncs write.

    sd = gathered_state_dict(policy)              # collective; None in one process
    opt = gathered_optimizer_state(policy, opt)   # collective; None in one process
    load_full_optimizer_state(policy, opt, full)  # a resume: rank 0's state, broadcast

Every function is a collective under torchrun: each rank calls it, rank 0 receives the
full CPU tensors ({} elsewhere). A LoRA policy (`learner.lora`) gathers its adapter
alone (`lora_` parameters, each all-gathered from its shards): the frozen base is the
initial model, never written, so a sync or checkpoint under FSDP moves megabytes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from grpo_stream.learner.distributed import is_distributed, unwrap
from grpo_stream.learner.lora import is_lora, saved_state_dict


def full_state_dict_on_rank0(model) -> dict[str, torch.Tensor]:
    """Full CPU state dict under Hugging Face names on rank 0, {} elsewhere (a LoRA
    model's: its adapter entries alone, `learner.lora.saved_state_dict`). Collective.

    Single process: the plain state dict of the (unwrapped) model.
    """
    inner = unwrap(model)
    if not is_distributed():
        return {k: v.detach().cpu() for k, v in saved_state_dict(inner).items()}
    if is_lora(inner):
        return _gathered_adapter(inner)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(inner, options=opts)


def _gathered_adapter(inner) -> dict[str, torch.Tensor]:
    """The adapter's tensors, whole, on rank 0: one all-gather per `lora_` entry (every
    rank walks the same state dict in the same order), not the whole model's."""
    out = {}
    for name, value in inner.state_dict().items():
        if "lora_" not in name:
            continue
        full_tensor = getattr(value, "full_tensor", None)  # a DTensor shard under FSDP2
        whole = full_tensor() if callable(full_tensor) else value
        if dist.get_rank() == 0:
            out[name] = whole.detach().cpu()
    return out


def gathered_state_dict(model) -> dict[str, torch.Tensor] | None:
    """Under FSDP the full weights on rank 0 ({} elsewhere; a collective every rank calls);
    None in one process, where the model's own state dict is the full one."""
    return full_state_dict_on_rank0(model) if is_distributed() else None


def gathered_optimizer_state(model, optimizer) -> dict | None:
    """Under FSDP the full per-name optimizer state on rank 0 (collective); None in one
    process, where the checkpoint writes the optimizer's own state dict."""
    return full_optimizer_state_dict_on_rank0(model, optimizer) if is_distributed() else None


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
