"""Per-token log-probs (and entropy) of sampled tokens without a float32 [B, T, V] tensor.

Two entry points:

* `token_logprobs_from_logits(logits, ids)`: for a caller that already holds the logits.
  Rows are processed in chunks, each upcast to float32 on its own, and each chunk is
  checkpointed, so neither the forward nor the backward keeps a float32 copy of all the
  logits (the gradient w.r.t. `logits` itself is, unavoidably, logits-sized).
* `token_logprobs_from_hidden(hidden, lm_head_weight, ids)`: what the learner uses. It
  never builds the logits at all: a custom autograd function multiplies one chunk of
  final hidden states by the output embedding, reduces it to a log-prob (and entropy)
  per token, and drops it; the backward recomputes each chunk's logits and turns them
  into gradients for `hidden` and `lm_head_weight` at once. Peak extra memory is one
  [chunk, V] float32 block, whatever B*T is.

Both divide the logits by `temperature` first: vLLM reports *processed* log-probs of
sampling at temperature tau, so the learner must score the same distribution (top-p /
top-k truncation is not modelled). Both work under bf16 autocast: the matmul runs in
the autocast dtype, the softmax in float32.

    logprobs, entropy = token_logprobs_from_hidden(h, model.lm_head.weight, ids,
                                                   chunk_size=1024, with_entropy=True)

`ids[b, t]` must be a valid token id everywhere (pad with 0 and mask the position).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def _check_ids(name: str, lead: torch.Size, ids: torch.Tensor) -> None:
    if ids.shape != lead:
        raise ValueError(f"ids: shape {tuple(ids.shape)} does not match {name} {tuple(lead)}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"ids: expected an integer tensor, got {ids.dtype}")


def _check_chunk(chunk_size: int, temperature: float) -> None:
    if chunk_size < 1:
        raise ValueError(f"chunk_size: must be >= 1, got {chunk_size}")
    if not temperature > 0:
        raise ValueError(f"temperature: must be > 0, got {temperature}")


# ---------------------------------------------------------------- (a) from logits


def _logits_chunk_logprobs(logits: torch.Tensor, ids: torch.Tensor, temperature: float):
    z = logits.float()  # [c, V] the only float32 copy, one chunk at a time
    if temperature != 1.0:
        z = z / temperature
    picked = z.gather(-1, ids.unsqueeze(-1)).squeeze(-1)  # [c]
    return picked - torch.logsumexp(z, dim=-1)  # [c]


def token_logprobs_from_logits(
    logits: torch.Tensor, ids: torch.Tensor, chunk_size: int = 1024, temperature: float = 1.0
) -> torch.Tensor:
    """Log-prob of `ids` under softmax(logits / temperature): [B, T, V], [B, T] -> [B, T] float32."""
    _check_chunk(chunk_size, temperature)
    if logits.dim() != 3:
        raise ValueError(f"logits: expected [B, T, V], got shape {tuple(logits.shape)}")
    _check_ids("logits[..., 0]", logits.shape[:2], ids)
    flat = logits.reshape(-1, logits.shape[-1])  # [N, V]
    flat_ids = ids.reshape(-1).long()  # [N]
    track = torch.is_grad_enabled() and flat.requires_grad
    outs = []
    # split (not slicing) so the backward concatenates the chunk grads once
    for z_c, id_c in zip(flat.split(chunk_size), flat_ids.split(chunk_size), strict=True):
        if track:  # recompute the float32 chunk in backward instead of keeping it
            out = checkpoint(_logits_chunk_logprobs, z_c, id_c, temperature, use_reentrant=False)
        else:
            out = _logits_chunk_logprobs(z_c, id_c, temperature)
        outs.append(out)  # [c]
    return torch.cat(outs).view(ids.shape)  # [B, T]


# ---------------------------------------------------------------- (b) from hidden


def _chunk_logits(h: torch.Tensor, w: torch.Tensor, temperature: float, buf: torch.Tensor):
    """[c, H] x [V, H] (compute dtype) -> float32 logits / temperature [c, V], written into buf.

    Reusing one workspace keeps the CPU allocator from mapping (and page-faulting) a fresh
    [c, V] block for every chunk.
    """
    z = buf[: h.shape[0]]  # [c, V] contiguous prefix of the workspace
    if h.dtype == torch.float32 and w.dtype == torch.float32:
        torch.mm(h, w.t(), out=z)
    else:
        z.copy_(h @ w.t())  # bf16/fp16 matmul, upcast per chunk
    if temperature != 1.0:
        z.div_(temperature)
    return z


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.unsqueeze(1) @ b.unsqueeze(2)).view(-1)  # [c] without a [c, V] product


def _chunk_forward(z: torch.Tensor, ids: torch.Tensor, ent_buf: torch.Tensor | None):
    """Logits [c, V] -> (logprob [c], logsumexp [c], entropy [c] or None); overwrites z."""
    picked = z.gather(-1, ids.unsqueeze(-1)).squeeze(-1)  # [c]
    top = z.amax(dim=-1, keepdim=True)  # [c, 1]
    shifted = z.sub_(top)  # [c, V] z - max
    ent = None
    if ent_buf is None:
        total = shifted.exp_().sum(-1)  # [c]
    else:
        e = torch.exp(shifted, out=ent_buf[: z.shape[0]])  # [c, V]
        total = e.sum(-1)  # [c]
        # H = -sum p log p = log total - sum e (z - max) / total
        ent = total.log() - _rowdot(e, shifted) / total
    lse = top.squeeze(-1) + total.log()  # [c]
    return picked - lse, lse, ent


def _chunk_grad_logits(z, ids, lse, ent, g_lp, g_ent, ent_buf):
    """d(loss)/d(logits / temperature) for one chunk [c, V], overwriting z.

    d lp / d z_j = onehot_j - p_j;  d H / d z_j = -p_j (log p_j + H)  (since E_p[log p] = -H).
    """
    logp = z.sub_(lse.unsqueeze(-1))  # [c, V]
    if g_ent is not None:
        p = torch.exp(logp, out=ent_buf[: z.shape[0]])  # [c, V]
        gz = logp.add_(ent.unsqueeze(-1)).mul_(-g_ent.unsqueeze(-1))  # -g_ent (log p + H)
        if g_lp is not None:
            gz.sub_(g_lp.unsqueeze(-1))
        gz.mul_(p)  # [c, V]
    else:
        gz = logp.exp_().mul_(-g_lp.unsqueeze(-1))  # [c, V] -g_lp p
    if g_lp is not None:
        gz.scatter_add_(-1, ids.unsqueeze(-1), g_lp.unsqueeze(-1))
    return gz


def _workspace(rows: int, weight: torch.Tensor, with_entropy: bool):
    shape = (rows, weight.shape[0])
    buf = torch.empty(shape, dtype=torch.float32, device=weight.device)  # [chunk, V]
    ent_buf = torch.empty_like(buf) if with_entropy else None  # [chunk, V]
    return buf, ent_buf


class _HiddenLogprobs(torch.autograd.Function):
    """Chunked lm-head + log-softmax + gather, recomputing each chunk's logits in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, ids, chunk_size, temperature, with_entropy, cdtype):
        # hidden [N, H], weight [V, H], ids [N]
        ctx.set_materialize_grads(False)
        n = hidden.shape[0]
        lp = torch.empty(n, dtype=torch.float32, device=hidden.device)  # [N]
        lse = torch.empty_like(lp)  # [N]
        ent = torch.empty_like(lp) if with_entropy else lp.new_empty(0)  # [N] or [0]
        w = weight.to(cdtype)  # [V, H]
        buf, ent_buf = _workspace(min(chunk_size, n), weight, with_entropy)
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, n, chunk_size):
                e = min(s + chunk_size, n)
                z = _chunk_logits(hidden[s:e].to(cdtype), w, temperature, buf)  # [c, V]
                lp[s:e], lse[s:e], ent_c = _chunk_forward(z, ids[s:e], ent_buf)
                if with_entropy:
                    ent[s:e] = ent_c
        ctx.save_for_backward(hidden, weight, ids, lse, ent)
        ctx.cfg = (chunk_size, temperature, with_entropy, cdtype)
        if not with_entropy:
            ctx.mark_non_differentiable(ent)
        return lp, ent

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        hidden, weight, ids, lse, ent = ctx.saved_tensors
        chunk_size, temperature, with_entropy, cdtype = ctx.cfg
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g_ent = g_ent if with_entropy else None
        if (g_lp is None and g_ent is None) or not (need_h or need_w):
            return (None,) * 7
        n = hidden.shape[0]
        grad_h = torch.empty_like(hidden) if need_h else None  # [N, H]
        # float32 accumulator across chunks: parameter-sized, not logits-sized
        grad_w = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        )
        w = weight.to(cdtype)  # [V, H]
        buf, ent_buf = _workspace(min(chunk_size, n), weight, g_ent is not None)
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, n, chunk_size):
                e = min(s + chunk_size, n)
                h = hidden[s:e].to(cdtype)  # [c, H]
                z = _chunk_logits(h, w, temperature, buf)  # [c, V]
                gz = _chunk_grad_logits(
                    z,
                    ids[s:e],
                    lse[s:e],
                    ent[s:e] if g_ent is not None else None,
                    g_lp[s:e] if g_lp is not None else None,
                    g_ent[s:e] if g_ent is not None else None,
                    ent_buf,
                )  # [c, V] float32
                if temperature != 1.0:
                    gz.div_(temperature)  # chain rule through logits / temperature
                gz = gz.to(cdtype)  # [c, V]
                if need_h:
                    grad_h[s:e] = gz @ w  # [c, H]
                if need_w and gz.dtype == torch.float32:
                    grad_w.addmm_(gz.t(), h)  # [V, H] in place, no [V, H] temporary
                elif need_w:
                    grad_w.add_(gz.t() @ h)  # [V, H]
        grad_w = grad_w.to(weight.dtype) if need_w else None
        return grad_h, grad_w, None, None, None, None, None


def check_hidden_args(hidden, lm_head_weight, ids, chunk_size: int, temperature: float) -> None:
    """ValueError naming the argument unless hidden [B, T, H], weight [V, H], ids [B, T]."""
    _check_chunk(chunk_size, temperature)
    if hidden.dim() != 3:
        raise ValueError(f"hidden: expected [B, T, H], got shape {tuple(hidden.shape)}")
    if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"lm_head_weight: expected [V, {hidden.shape[-1]}], got {tuple(lm_head_weight.shape)}"
        )
    _check_ids("hidden[..., 0]", hidden.shape[:2], ids)


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def token_logprobs_from_hidden(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    ids: torch.Tensor,
    chunk_size: int = 1024,
    with_entropy: bool = False,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs [B, T] (and entropy [B, T]) of `ids` under softmax(hidden @ W.T / temperature).

    hidden [B, T, H], lm_head_weight [V, H], ids [B, T]. Outputs are float32 and carry
    gradients to `hidden` and `lm_head_weight`; `chunk_size` tokens are processed at once.
    """
    check_hidden_args(hidden, lm_head_weight, ids, chunk_size, temperature)
    flat = hidden.reshape(-1, hidden.shape[-1])  # [N, H]
    flat_ids = ids.reshape(-1).long()  # [N]
    cdtype = _compute_dtype(hidden, lm_head_weight)
    lp, ent = _HiddenLogprobs.apply(
        flat, lm_head_weight, flat_ids, chunk_size, float(temperature), with_entropy, cdtype
    )
    return lp.view(ids.shape), (ent.view(ids.shape) if with_entropy else None)
