"""LoRA in the learner: the policy wrapped with peft, and the reference with its adapter off.

    model = apply_lora(model, cfg.lora)                 # adapters injected, base frozen
    model = apply_lora(model, cfg.lora, adapter_dir)    # ... from a saved adapter (resume)
    with adapter_disabled(model):                        # the base model: the reference
        ref_lp = sequence_logprobs(model, mb, ...)

`apply_lora` injects peft's LoRA layers into the Hugging Face model in place and returns
that same model (not peft's `PeftModel` wrapper), so everything that reads a causal LM
(`model.base_model`, `get_output_embeddings`, the shared-prefix forward, FSDP's layer
list) reads it unchanged. Only the adapter's parameters require grad, so the optimizer
(`learner.optim`, which takes the parameters that require grad) holds only them. With
`loss.beta > 0` the reference is this same model with every adapter layer switched off
(`adapter_disabled`): the frozen base weights are the initial policy, so no second
copy is loaded. The adapter's files are written by `grpo_stream.sync.lora.write_adapter`.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from grpo_stream.config.lora import LoraConfig


def peft_lora_config(cfg: LoraConfig):
    """peft's `LoraConfig` for the `[lora]` section."""
    import peft

    return peft.LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def apply_lora(model: torch.nn.Module, cfg: LoraConfig, adapter_dir: Path | str | None = None):
    """`model` with LoRA adapters injected (a fresh adapter, or the one saved in
    `adapter_dir`) and every base parameter frozen; ValueError naming lora.target_modules
    when none of them is in the model."""
    import peft

    try:
        if adapter_dir is None:
            wrapped = peft.get_peft_model(model, peft_lora_config(cfg))
        else:
            wrapped = peft.PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)
    except ValueError as err:  # peft: "Target modules {...} not found in the base model"
        raise ValueError(f"lora.target_modules = {cfg.target_modules}: {err}") from err
    inner = wrapped.base_model.model  # the Hugging Face model itself, adapters inside
    if getattr(inner, "is_gradient_checkpointing", False):
        # frozen embeddings give the checkpointed blocks no input that requires grad
        inner.enable_input_require_grads()
    return inner


def adapter_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The peft adapter layers inside `model` (none: not a LoRA model)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def is_lora(model: torch.nn.Module) -> bool:
    return bool(getattr(model, "peft_config", None)) and bool(adapter_layers(model))


@contextlib.contextmanager
def adapter_disabled(model: torch.nn.Module):
    """`model` computes with its base weights alone inside the block (a no-op for a model
    without adapters); the adapters are switched back on however the block ends."""
    layers = adapter_layers(model)
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def saved_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint of `model` is written from: a LoRA model's adapter tensors
    alone (the `lora_` entries of its state dict: the frozen base is the initial model,
    never written), else the whole state dict. A background writer copies this, not
    the whole model (`learner.background.snapshot`)."""
    sd = model.state_dict()
    if not is_lora(model):
        return sd
    return {k: v for k, v in sd.items() if "lora_" in k}


def is_adapter_dir(folder: Path | str) -> bool:
    """A saved adapter (adapter_config.json), not a whole model."""
    return (Path(folder) / "adapter_config.json").is_file()


def policy_folders(cfg: LoraConfig, weights: str, initial: str) -> tuple[str, str | None]:
    """(the folder the policy's base weights load from, the adapter folder or None) for a
    learner starting from `weights` (the initial model, or a checkpoint's model/) whose
    initial model is `initial`. A LoRA policy's base is always the initial model, so
    the adapter-off reference stays the initial policy. ValueError naming lora.enabled
    when the checkpoint's kind and the config disagree."""
    adapter = is_adapter_dir(weights)
    if adapter and not cfg.enabled:
        raise ValueError(
            f"{weights} holds a LoRA adapter: set lora.enabled = true (with the same "
            "[lora] section) to continue from it"
        )
    if cfg.enabled and not adapter and Path(weights).resolve() != Path(initial).resolve():
        raise ValueError(
            f"lora.enabled = true, but {weights} holds full weights (a checkpoint of a run "
            "without LoRA): continue it with lora.enabled = false"
        )
    return (initial, weights) if adapter else (weights, None)
