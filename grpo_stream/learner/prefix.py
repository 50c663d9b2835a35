"""The shared-prefix forward: each distinct prompt runs through the decoder once, and its
G completions continue from it (Prefix Grouper, arXiv 2506.05433), in one of two ways.

    hidden = shared_prefix_hidden(model, mb)   # [B, T = Lc, H], mb in the shared layout

Packed groups (`mb.prefix.packed`, `batch.PackedRows`; the default while the mask is
small): ONE forward of N rows, row n = prompt n then each of its completions' inputs,
with the grouped attention mask (`grouped_attention_mask`): prompt tokens attend
causally within the prompt, completion tokens to their prompt and causally within their
own completion. Position ids restart at P for every completion, so each token sees
exactly the keys, values and positions of its padded sequence. No padding between
completions and one pass: the fewest tokens and kernel calls. The hidden states behind
the targets are gathered back to [B, Lc, H] (`PackedRows.gather`; completion token 0
from the prompt's last position, whose gradient sums over the group).

KV cache (long rows, whose [N, 1, L, L] mask would be too large):

1. Prompt pass: the N distinct prompts [N, Lp] (right-padded, default positions) with
   `use_cache=True`; their KV cache is [N, kv_heads, Lp, d] per layer.
2. The cache is widened to the B rows by indexing on the batch dimension (a stride-0
   `expand` when the micro-batch holds one prompt): no copy of the prompt's activations,
   and still differentiable, so one backward sends every completion's gradient into its
   prompt's keys and values (the expand/index backward sums the rows).
3. Completion pass: completion[:, :-1] [B, Lc - 1] against that cache, with position ids
   P_b + j and a [B, Lp + Lc - 1] padding mask (prompt pads sit between prompt and
   completion; they are masked, and no query row is ever fully masked).
   With `prefix.chunks` (`batch.completion_chunks`) step 3 runs once per chunk of rows
   of similar completion length, each only as wide as its longest completion, on a
   cache reset to the prompt's keys/values: less padding, the same numbers.
4. Completion token 0 is predicted from the prompt's LAST position: that hidden state
   (prompt pass, column P_b - 1) is put in front of the completion pass's states. So the
   hidden state behind every completion token is the one the padded layout computes, up
   to float rounding: the log-probs, losses and gradients equal the padded path's.

`SUPPORTED_MODEL_TYPES` lists the model types checked to give the padded path's numbers
(Llama, Qwen2); `unsupported_reason(model)` says why a model cannot take this path (then
the learner uses the padded layout and logs the reason once, see `learner.plan`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from grpo_stream.learner.batch import MicroBatch

# The model types that take the shared-prefix forward, each checked against the padded
# path (log-probs, entropy, loss and every gradient to 1e-5: tests/unit/
# test_learner_prefix.py), and what was checked. Every other model type (mistral, qwen3,
# gemma, phi3, ...) falls back to the padded layout, logged once, until someone adds it
# here with the same tests: its attention may differ in ways a custom mask or a widened
# KV cache does not honour (soft-capping, per-layer sliding windows, cross-layer caches).
SUPPORTED_MODEL_TYPES = {
    "llama": "Llama, SmolLM2: no biases; tied and untied embeddings",
    "qwen2": "Qwen2, Qwen2.5: q/k/v biases; only with every layer full attention",
}
ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")  # honour a custom 4D mask, and a KV cache
# bytes per element of the grouped attention mask (`grouped_attention_mask`)
MASK_ELEMENT_BYTES = {"sdpa": 1, "eager": 4}  # boolean; additive float32


def _sliding_layers(cfg) -> str | None:
    """Why `cfg`'s attention is windowed somewhere (a custom 4D mask and the KV cache
    would drop the window), else None. Qwen2 lists its layers' kinds in `layer_types`
    (sliding only with use_sliding_window, from max_window_layers on)."""
    kinds = getattr(cfg, "layer_types", None)
    if kinds is not None:
        if "sliding_attention" in kinds:
            n = kinds.count("sliding_attention")
            return (
                f"sliding-window attention in {n} layer(s) (sliding_window = {cfg.sliding_window})"
            )
        return None
    if getattr(cfg, "sliding_window", None):
        return f"sliding-window attention (sliding_window = {cfg.sliding_window})"
    return None


def unsupported_reason(model) -> str | None:
    """None if `model` (a Hugging Face causal LM) can run the shared-prefix forward, else why."""
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(model, "base_model"):
        return f"{type(model).__name__} is not a Hugging Face causal LM"
    if cfg.model_type not in SUPPORTED_MODEL_TYPES:
        return (
            f"model_type {cfg.model_type!r} is not among the checked ones "
            f"({', '.join(SUPPORTED_MODEL_TYPES)}; learner.prefix.SUPPORTED_MODEL_TYPES)"
        )
    impl = getattr(cfg, "_attn_implementation", None)
    if impl not in ATTENTION_IMPLEMENTATIONS:
        return f"attention implementation {impl!r} is not one of {ATTENTION_IMPLEMENTATIONS}"
    window = _sliding_layers(cfg)
    if window is not None:
        return window
    if getattr(model, "is_gradient_checkpointing", False):
        return "gradient checkpointing recomputes layers, which would re-append to the KV cache"
    return None


def mask_element_bytes(model) -> int:
    """Bytes per element of the grouped attention mask `model` would get: 1 (sdpa's
    boolean mask), 4 (eager's additive float32 mask, and any other implementation)."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return MASK_ELEMENT_BYTES.get(impl, 4)


def grouped_attention_mask(segments: torch.Tensor, implementation: str) -> torch.Tensor:
    """The packed rows' attention mask [N, 1, L, L] from their segments [N, L] (0 prompt,
    k >= 1 completion k, -1 padding): query i sees key j <= i of the prompt or of its own
    completion; a padding query sees only itself (no row fully masked). Boolean (True:
    attend) for sdpa; additive float32 (0 / most negative) for eager attention."""
    L = segments.shape[1]
    q, k = segments[:, :, None], segments[:, None, :]  # [N, L, 1], [N, 1, L]
    causal = torch.ones(L, L, dtype=torch.bool, device=segments.device).tril()  # [L, L]
    ok = causal & (q >= 0) & (k >= 0) & ((k == 0) | (k == q))  # [N, L, L]
    ok = ok | torch.eye(L, dtype=torch.bool, device=segments.device)  # [N, L, L]
    ok = ok[:, None]  # [N, 1, L, L]
    if implementation == "sdpa":
        return ok
    lowest = torch.finfo(torch.float32).min
    return torch.zeros(ok.shape, device=ok.device).masked_fill(~ok, lowest)  # [N, 1, L, L]


def _packed_hidden(base, mb: MicroBatch) -> torch.Tensor:
    """Hidden states [B, Lc, H] behind mb's targets from one forward of its packed groups;
    the columns past a row's own completion (masked) are zeros."""
    pk = mb.prefix.packed
    mask = grouped_attention_mask(pk.segments, base.config._attn_implementation)
    out = base(
        input_ids=pk.input_ids,  # [N, L]
        attention_mask=mask,  # [N, 1, L, L]
        position_ids=pk.position_ids,  # [N, L]
        use_cache=False,
    )
    h = out.last_hidden_state  # [N, L, H]
    flat = torch.cat([h.flatten(0, 1), h.new_zeros(1, h.shape[-1])])  # [N * L + 1, H]
    return flat[pk.gather]  # [B, Lc, H]


def _widen_cache(cache, prompt_kv: list, group_of: torch.Tensor, n_prompts: int) -> None:
    """Each layer's [N, h, Lp, d] prompt keys/values -> [b, h, Lp, d], row i = its prompt's
    (`group_of` [b]); resets what a previous completion pass appended."""
    for layer, kv_pair in zip(cache.layers, prompt_kv, strict=True):
        for name, kv in zip(("keys", "values"), kv_pair, strict=True):  # kv [N, h, Lp, d]
            if n_prompts == 1:
                wide = kv.expand(group_of.shape[0], *kv.shape[1:])  # [b, h, Lp, d] view
            else:
                wide = kv.index_select(0, group_of)  # [b, h, Lp, d]
            setattr(layer, name, wide)


def _completion_pass(base, mb: MicroBatch, cache, prompt_kv, rows, width: int, last):
    """Hidden states [b, width, H] of the completion rows `rows` ([b] long, or None: all),
    their first `width` completion columns, against their prompts' cached keys/values."""
    lay, Lp = mb.prefix, mb.prefix.prompt_width

    def pick(t: torch.Tensor) -> torch.Tensor:
        return t if rows is None else t.index_select(0, rows)

    _widen_cache(cache, prompt_kv, pick(lay.group_of), lay.prompt_rows.shape[0])
    steps = torch.arange(width - 1, device=mb.input_ids.device)  # [width - 1]
    out = base(
        input_ids=pick(mb.input_ids[:, Lp : Lp + width - 1]),  # [b, width - 1]
        attention_mask=pick(mb.attention_mask[:, : Lp + width - 1]),  # [b, Lp + width - 1]
        position_ids=pick(lay.prompt_lens)[:, None] + steps,  # [b, width - 1]
        past_key_values=cache,
        use_cache=True,
    )
    return torch.cat([pick(last)[:, None], out.last_hidden_state], dim=1)  # [b, width, H]


def shared_prefix_hidden(model, mb: MicroBatch) -> torch.Tensor:
    """Final hidden states [B, Lc, H] behind each completion token of `mb` (shared layout):
    row b, column j predicts mb.targets[b, j]. With `lay.chunks` the completion pass runs
    once per chunk of similar-length rows, each only as wide as its longest completion;
    the columns past a row's own completion (masked) are zeros."""
    lay = mb.prefix
    if lay is None:
        raise ValueError("shared_prefix_hidden: the micro-batch is in the padded layout")
    base = model.base_model
    if lay.packed is not None:
        return _packed_hidden(base, mb)  # [B, Lc, H]
    Lp, Lc = lay.prompt_width, mb.targets.shape[1]
    prompt = base(
        input_ids=mb.input_ids[lay.prompt_rows, :Lp],  # [N, Lp]
        attention_mask=mb.attention_mask[lay.prompt_rows, :Lp],  # [N, Lp]
        use_cache=True,
    )
    last = prompt.last_hidden_state[lay.group_of, lay.prompt_lens - 1]  # [B, H]
    cache = prompt.past_key_values
    prompt_kv = [(layer.keys, layer.values) for layer in cache.layers]  # [N, h, Lp, d] each
    if not lay.chunks:
        return _completion_pass(base, mb, cache, prompt_kv, None, Lc, last)  # [B, Lc, H]
    parts = [
        F.pad(_completion_pass(base, mb, cache, prompt_kv, rows, w, last), (0, 0, 0, Lc - w))
        for rows, w in zip(lay.chunks, lay.chunk_widths, strict=True)
    ]  # [b_i, Lc, H] each
    return torch.cat(parts).index_select(0, lay.unsort)  # [B, Lc, H], rows back in order
