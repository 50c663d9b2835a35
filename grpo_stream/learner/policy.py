"""Loading the policy/reference models and computing their token log-probs and loss.

`sequence_logprobs` runs the decoder to its final hidden states and hands them with
the output-embedding matrix to `algo.token_logprobs_from_hidden`, which computes
logits chunk by chunk: the learner never holds a [B, T, V] logits tensor.
`sequence_loss` does the same for training through `algo.fused_loss_from_hidden`,
which also makes the output layer's gradients chunk by chunk. A micro-batch in the
shared-prefix layout runs each distinct prompt once (`learner.prefix`); the hidden
states, and so everything after them, then cover the completion tokens only. Logits are divided by
the sampling temperature, matching vLLM's processed log-probs.
"""

from __future__ import annotations

import contextlib

import torch

from grpo_stream.algo import fused_loss_from_hidden, token_logprobs_from_hidden
from grpo_stream.learner.batch import MicroBatch
from grpo_stream.learner.prefix import shared_prefix_hidden


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"learner.device = {name!r} but no CUDA device is available")
    return torch.device(name)


def load_causal_lm(path: str, device: torch.device, trainable: bool = True):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep the per-step console lines readable
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.to(device)
    if trainable:
        model.train()
        # dropout would make proximal and current log-probs differ at equal weights
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    else:
        model.eval()
        model.requires_grad_(False)
    return model


def autocast(device: torch.device, dtype: str):
    if dtype == "bfloat16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def final_hidden(model, mb: MicroBatch) -> torch.Tensor:
    """The decoder's final hidden states [B, T, H] behind mb.targets, in mb's layout: one
    forward of the padded rows, or the shared-prefix forward (`learner.prefix`)."""
    if mb.prefix is not None:
        return shared_prefix_hidden(model, mb)
    out = model.base_model(input_ids=mb.input_ids, attention_mask=mb.attention_mask)
    return out.last_hidden_state[:, :-1]  # [B, T, H]


def sequence_logprobs(
    model,
    mb: MicroBatch,
    temperature: float,
    chunk_size: int,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs of mb.targets under `model`: ([B, T], [B, T] entropy or None)."""
    hidden = final_hidden(model, mb)  # [B, T, H]
    weight = model.get_output_embeddings().weight  # [V, H]
    return token_logprobs_from_hidden(
        hidden, weight, mb.targets, chunk_size, with_entropy=with_entropy, temperature=temperature
    )


def sequence_loss(
    model,
    mb: MicroBatch,
    temperature: float,
    chunk_size: int,
    loss_fn,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(loss [], log-probs [B, T], entropy [B, T] or None); `loss_fn(rows, lp, ent)` as in
    `algo.fused_loss_from_hidden`. Only the loss carries gradient."""
    hidden = final_hidden(model, mb)  # [B, T, H]
    weight = model.get_output_embeddings().weight  # [V, H]
    return fused_loss_from_hidden(
        hidden, weight, mb.targets, loss_fn, chunk_size, temperature, with_entropy
    )
