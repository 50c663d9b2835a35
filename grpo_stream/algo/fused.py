"""The training loss straight from final hidden states, its gradient made chunk by chunk.

`token_logprobs_from_hidden` (logprobs.py) returns log-probs whose backward has to
recompute every chunk's logits: four [N, H] x [H, V]-sized matmuls per micro-batch
(forward, recompute, d hidden, d W) where the naive full-logits path does three. This
module removes the recompute by finishing each chunk while its softmax is still in hand,
as Liger's fused linear losses do:

    for each chunk of whole sequences (rows):
        z = h_rows @ W.T / tau                          # [c, V] float32, one workspace
        lp, entropy, p = softmax statistics of z       # [c], [c], p = softmax(z) in place
        loss_rows = loss_fn(rows, lp, entropy)         # the caller's loss of those rows
        g = d loss_rows / d lp                         # [c] autograd on a [rows, T] leaf
        dz = g * (onehot(ids) - p) / tau               # [c, V] in place over p
        dh_rows = dz @ W;   dW += dz.T @ h_rows        # the two gradient matmuls

The scalar it returns is the sum of the chunk losses; its backward only scales the
stored d hidden / d W by the incoming gradient. So `loss_fn` must be *additive over
rows*: the loss of the whole micro-batch equals the sum of the losses of any split of
its sequences. `grpo_loss` is, because it divides by batch-global normalisers (that is
what makes micro-batching exact) and because a chunk never splits a sequence (GSPO's
sequence ratio and seq-mean-token-mean need whole rows). Entropy is returned for
logging only; `loss_fn` receives it detached.

    loss, lp, ent = fused_loss_from_hidden(
        hidden, model.lm_head.weight, ids,
        lambda rows, lp, ent: grpo_loss(cfg, lp, old[rows], ..., metrics=False)[0],
        chunk_size=1024, temperature=0.7, with_entropy=True)
    loss.backward()            # d hidden flows on into the decoder, d W into lm_head

Peak extra memory: one [rows * T, V] float32 block (two with entropy) plus a float32
[V, H] gradient accumulator and the [B, T, H] hidden gradient, both of which the
backward would produce anyway, held from the forward until `backward()`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from grpo_stream.algo.logprobs import (
    _chunk_logits,
    _compute_dtype,
    _rowdot,
    _workspace,
    check_hidden_args,
)

# loss_fn(rows, logprobs [b, T] float32 with grad, entropy [b, T] or None) -> scalar
RowLoss = Callable[[slice, torch.Tensor, torch.Tensor | None], torch.Tensor]


def _softmax_stats(z: torch.Tensor, ids: torch.Tensor, ent_buf: torch.Tensor | None):
    """Logits [c, V] -> (logprob [c], entropy [c] or None, e [c, V], S [c]), softmax = e / S.

    e = exp(z - max) overwrites z (or the entropy buffer); the caller folds 1 / S into
    its gradient scale rather than spending a pass over [c, V] on it.
    """
    picked = z.gather(-1, ids.unsqueeze(-1)).squeeze(-1)  # [c]
    top = z.amax(dim=-1, keepdim=True)  # [c, 1]
    shifted = z.sub_(top)  # [c, V] z - max
    if ent_buf is None:
        e = shifted.exp_()  # [c, V] exp(z - max), in place
        total = e.sum(-1)  # [c]
        ent = None
    else:
        e = torch.exp(shifted, out=ent_buf[: z.shape[0]])  # [c, V]
        total = e.sum(-1)  # [c]
        ent = total.log() - _rowdot(e, shifted) / total  # [c] H = log S - E_p[z - max]
    lp = picked - top.squeeze(-1) - total.log()  # [c]
    return lp, ent, e, total


def _row_grad(loss_fn: RowLoss, rows: slice, lp: torch.Tensor, ent: torch.Tensor | None):
    """(loss of these rows, d loss / d lp [b, T]) from a leaf copy of the log-probs."""
    leaf = lp.detach().requires_grad_()  # [b, T]
    with torch.enable_grad():
        loss = loss_fn(rows, leaf, ent)
        if loss.dim() != 0:
            raise ValueError(f"loss_fn: must return a scalar, got shape {tuple(loss.shape)}")
        if not loss.requires_grad:  # e.g. every token masked: no gradient at all
            return loss.detach(), torch.zeros_like(leaf)
        (grad,) = torch.autograd.grad(loss, leaf, allow_unused=True)
    return loss.detach(), (torch.zeros_like(leaf) if grad is None else grad)


class _FusedLoss(torch.autograd.Function):
    """Forward: loss + both gradients, chunk by chunk. Backward: scale the stored gradients."""

    @staticmethod
    def forward(ctx, hidden, weight, ids, loss_fn, rows_per_chunk, temperature, entropy, cdtype):
        # hidden [B, T, H], weight [V, H], ids [B, T]
        b, t, h_dim = hidden.shape
        need_h, need_w = hidden.requires_grad, weight.requires_grad
        lp_all = torch.empty(b, t, dtype=torch.float32, device=hidden.device)  # [B, T]
        ent_all = torch.empty_like(lp_all) if entropy else lp_all.new_empty(0)  # [B, T] or [0]
        grad_h = torch.empty_like(hidden) if need_h else None  # [B, T, H], every row written
        grad_w = (  # float32 accumulator across chunks: parameter-sized, not logits-sized
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        )  # [V, H]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)  # []
        w = weight.detach().to(cdtype)  # [V, H]
        buf, ent_buf = _workspace(min(rows_per_chunk, b) * t, weight, entropy)
        with torch.autocast(hidden.device.type, enabled=False):
            for r0 in range(0, b, rows_per_chunk):
                rows = slice(r0, min(r0 + rows_per_chunk, b))
                n = rows.stop - rows.start
                h = hidden[rows].detach().reshape(n * t, h_dim).to(cdtype)  # [c, H]
                z = _chunk_logits(h, w, temperature, buf)  # [c, V]
                flat_ids = ids[rows].reshape(-1)  # [c]
                lp, ent, e, s = _softmax_stats(z, flat_ids, ent_buf)  # [c], [c]|None, [c, V], [c]
                lp_all[rows] = lp_rows = lp.view(n, t)  # [n, T]
                ent_rows = None
                if entropy:
                    ent_all[rows] = ent_rows = ent.view(n, t)  # [n, T]
                loss, g = _row_grad(loss_fn, rows, lp_rows, ent_rows)  # [], [n, T]
                total += loss
                g = g.reshape(-1).float()  # [c]
                # d lp / d z = onehot - p with p = e / S, through z = logits / tau: one pass
                g = g / temperature  # [c]
                gz = e.mul_((-g / s).unsqueeze(-1))  # [c, V] -g p / tau
                gz.scatter_add_(-1, flat_ids.unsqueeze(-1), g.unsqueeze(-1))
                gz = gz.to(cdtype)  # [c, V]
                if need_h:
                    grad_h[rows] = (gz @ w).view(n, t, h_dim).to(grad_h.dtype)  # [n, T, H]
                if need_w and gz.dtype == torch.float32:
                    grad_w.addmm_(gz.t(), h)  # [V, H] in place
                elif need_w:
                    grad_w.add_(gz.t() @ h)  # [V, H]
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype) if need_w else None)
        ctx.mark_non_differentiable(lp_all, ent_all)
        return total, lp_all, ent_all

    @staticmethod
    def backward(ctx, g_loss, _g_lp, _g_ent):
        grad_h, grad_w = ctx.saved_tensors
        grad_h = None if grad_h is None else grad_h * g_loss.to(grad_h.dtype)
        grad_w = None if grad_w is None else grad_w * g_loss.to(grad_w.dtype)
        return grad_h, grad_w, None, None, None, None, None, None


def fused_loss_from_hidden(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    ids: torch.Tensor,
    loss_fn: RowLoss,
    chunk_size: int = 1024,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(loss [], log-probs [B, T], entropy [B, T] or None) of `ids` under softmax(h W^T / tau).

    hidden [B, T, H], lm_head_weight [V, H], ids [B, T]. `loss_fn(rows, lp, ent)` gets the
    float32 log-probs of `hidden[rows]` (a leaf with grad) and returns that slice's scalar
    loss; it must be additive over rows (see the module docstring). Only the returned
    loss carries gradient; log-probs and entropy are detached, for metrics. Chunks hold
    max(1, chunk_size // T) whole sequences.
    """
    check_hidden_args(hidden, lm_head_weight, ids, chunk_size, temperature)
    rows = max(1, chunk_size // max(hidden.shape[1], 1))
    cdtype = _compute_dtype(hidden, lm_head_weight)
    loss, lp, ent = _FusedLoss.apply(
        hidden, lm_head_weight, ids.long(), loss_fn, rows, float(temperature), with_entropy, cdtype
    )
    return loss, lp, (ent if with_entropy else None)
