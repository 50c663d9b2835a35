"""The shared-prefix forward: each distinct prompt runs through the decoder once, and its
G completions continue from that prompt's KV cache (Prefix Grouper, arXiv 2506.05433).

    hidden = shared_prefix_hidden(model, mb)   # [B, T = Lc, H], mb in the shared layout

1. Prompt pass: the N distinct prompts [N, Lp] (right-padded, default positions) with
   `use_cache=True`; their KV cache is [N, kv_heads, Lp, d] per layer.
2. The cache is widened to the B rows by indexing on the batch dimension (a stride-0
   `expand` when the micro-batch holds one prompt): no copy of the prompt's activations,
   and still differentiable, so one backward sends every completion's gradient into its
   prompt's keys and values (the expand/index backward sums the rows).
3. Completion pass: completion[:, :-1] [B, Lc - 1] against that cache, with position ids
   P_b + j and a [B, Lp + Lc - 1] padding mask (prompt pads sit between prompt and
   completion; they are masked, and no query row is ever fully masked).
4. Completion token 0 is predicted from the prompt's LAST position: that hidden state
   (prompt pass, column P_b - 1) is put in front of the completion pass's states. So the
   hidden state behind every completion token is the one the padded layout computes, up
   to float rounding: the log-probs, losses and gradients equal the padded path's.

`unsupported_reason(model)` says why a model cannot take this path (then the learner
uses the padded layout and logs the reason once, see `learner.plan`).
"""

from __future__ import annotations

import torch

from grpo_stream.learner.batch import MicroBatch

# model types whose decoder was checked to give the padded path's numbers here (tests/unit/
# test_learner_prefix.py); others may work but fall back until someone checks them
CHECKED_MODEL_TYPES = ("llama",)
ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")  # honour a 2D padding mask with a KV cache


def unsupported_reason(model) -> str | None:
    """None if `model` (a Hugging Face causal LM) can run the shared-prefix forward, else why."""
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(model, "base_model"):
        return f"{type(model).__name__} is not a Hugging Face causal LM"
    if cfg.model_type not in CHECKED_MODEL_TYPES:
        return f"model_type {cfg.model_type!r} is not among the checked ones {CHECKED_MODEL_TYPES}"
    impl = getattr(cfg, "_attn_implementation", None)
    if impl not in ATTENTION_IMPLEMENTATIONS:
        return f"attention implementation {impl!r} is not one of {ATTENTION_IMPLEMENTATIONS}"
    if getattr(cfg, "sliding_window", None):
        return f"sliding-window attention (sliding_window = {cfg.sliding_window})"
    if getattr(model, "is_gradient_checkpointing", False):
        return "gradient checkpointing recomputes layers, which would re-append to the KV cache"
    return None


def _widen_cache(cache, group_of: torch.Tensor, n_prompts: int) -> None:
    """Each layer's [N, h, Lp, d] keys/values -> [B, h, Lp, d], row b = its prompt's."""
    for layer in cache.layers:
        for name in ("keys", "values"):
            kv = getattr(layer, name)  # [N, h, Lp, d]
            if n_prompts == 1:
                wide = kv.expand(group_of.shape[0], *kv.shape[1:])  # [B, h, Lp, d] view
            else:
                wide = kv.index_select(0, group_of)  # [B, h, Lp, d]
            setattr(layer, name, wide)


def shared_prefix_hidden(model, mb: MicroBatch) -> torch.Tensor:
    """Final hidden states [B, Lc, H] behind each completion token of `mb` (shared layout):
    row b, column j predicts mb.targets[b, j]."""
    lay = mb.prefix
    if lay is None:
        raise ValueError("shared_prefix_hidden: the micro-batch is in the padded layout")
    base = model.base_model
    Lp, Lc = lay.prompt_width, mb.targets.shape[1]
    prompt = base(
        input_ids=mb.input_ids[lay.prompt_rows, :Lp],  # [N, Lp]
        attention_mask=mb.attention_mask[lay.prompt_rows, :Lp],  # [N, Lp]
        use_cache=True,
    )
    last = prompt.last_hidden_state[lay.group_of, lay.prompt_lens - 1]  # [B, H]
    cache = prompt.past_key_values
    _widen_cache(cache, lay.group_of, lay.prompt_rows.shape[0])
    steps = torch.arange(Lc - 1, device=mb.input_ids.device)  # [Lc - 1]
    completion = base(
        input_ids=mb.input_ids[:, Lp : Lp + Lc - 1],  # [B, Lc - 1]
        attention_mask=mb.attention_mask[:, : Lp + Lc - 1],  # [B, Lp + Lc - 1]
        position_ids=lay.prompt_lens[:, None] + steps,  # [B, Lc - 1]
        past_key_values=cache,
        use_cache=True,
    )
    return torch.cat([last[:, None], completion.last_hidden_state], dim=1)  # [B, Lc, H]
