"""Groups from the buffer → the tensors the learner trains on, in one of two layouts.

Padded layout (`collate`): a sequence is prompt + completion, right-padded to the longest
in its micro-batch. Log-probs are indexed by *target* position: column j holds
log p(x[j+1] | x[:j+1]), so a completion that starts at token P occupies target columns
P-1 .. P+C-2. The `mask` is 1 exactly there (but 0 on the tokens of a multi-turn
episode's environment turns, `Sample.policy_mask`: inputs, never targets); behaviour log-probs from vLLM are placed in
the same columns, so every [B, T] tensor lines up.

Shared-prefix layout (`collate_shared`, used by `learner.prefix`): rows that share a
prompt share one prompt forward. `input_ids` is [B, Lp + Lc]: the prompt right-padded to
Lp columns, then the completion right-padded to Lc. The [B, T] tensors cover the
completion only (T = Lc): column j holds log p(completion[j] | prompt, completion[:j]),
so `targets` = input_ids[:, Lp:]. `prefix` says which row's prompt is run (one per
distinct prompt) and which prompt each row continues. `prefix.packed` (`PackedRows`,
when its grouped attention mask fits `pack_mask_bytes`) also lays each prompt's group
out as one row, the prompt then every completion, for a single forward.

`make_micro_batches` splits a step's samples into micro-batches either of at most
`size` sequences (in order) or, with `max_tokens`, sorted by length and packed to at
most that many forward tokens, padding counted (`learner.split`). In the shared-prefix
layout a group (the rows with one prompt) stays whole unless it alone exceeds the bound.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from grpo_stream.buffer.schema import Sample
from grpo_stream.learner.split import pack_indices, packed_row_lengths

# `completion_chunks`: an extra completion pass's cost in completion tokens (kernel calls,
# a KV-cache concat per layer)
CHUNK_COST_TOKENS = 16


@dataclass
class PackedRows:
    """A shared-prefix micro-batch as N packed rows, one forward (Prefix Grouper's grouped
    attention): row n is prompt n, then the inputs completion[:-1] of each of its rows in
    turn, then padding. Each completion attends to its prompt and causally to itself
    (`learner.prefix.grouped_attention_mask`); no padding between them."""

    input_ids: torch.Tensor  # [N, L] long
    position_ids: torch.Tensor  # [N, L] long: 0..P-1 (prompt), P..P+C-2 (each completion)
    segments: torch.Tensor  # [N, L] long: 0 prompt, k >= 1 the row's k-th completion, -1 pad
    gather: torch.Tensor  # [B, Lc] long: the flattened [N * L] position behind each target
    # (completion token 0: the prompt's last position); N * L: none (a masked column)

    def to(self, device: torch.device | str) -> PackedRows:
        return PackedRows(*(getattr(self, f.name).to(device) for f in fields(self)))

    @property
    def mask_bytes(self) -> int:
        """Size of its boolean (sdpa) grouped attention mask [N, 1, L, L]: N x L^2 bytes;
        eager attention's additive float32 mask takes 4 times that."""
        n, L = self.input_ids.shape
        return n * L * L


@dataclass
class PrefixLayout:
    """Which prompt each row of a shared-prefix micro-batch continues."""

    prompt_rows: torch.Tensor  # [N] long: one row per distinct prompt, whose prompt is run
    group_of: torch.Tensor  # [B] long in 0..N-1: the prompt (index into prompt_rows) of a row
    prompt_lens: torch.Tensor  # [B] long: P_b, real prompt tokens of each row
    prompt_width: int  # Lp: prompt columns of input_ids
    # the completion pass by length (`completion_chunks`); empty: one pass of every row
    chunks: list[torch.Tensor] = field(default_factory=list)  # [b_i] long rows, by length
    chunk_widths: list[int] = field(default_factory=list)  # Lc_i: completion columns of each
    unsort: torch.Tensor | None = None  # [B] long: row b's position in cat(chunks)
    packed: PackedRows | None = None  # set: one forward of packed groups instead

    def to(self, device: torch.device | str) -> PrefixLayout:
        return PrefixLayout(
            self.prompt_rows.to(device),
            self.group_of.to(device),
            self.prompt_lens.to(device),
            self.prompt_width,
            [c.to(device) for c in self.chunks],
            self.chunk_widths,
            None if self.unsort is None else self.unsort.to(device),
            None if self.packed is None else self.packed.to(device),
        )


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # [B, L] long
    attention_mask: torch.Tensor  # [B, L] long, 1 on real tokens
    targets: torch.Tensor  # [B, T] long: input_ids[:, 1:] (padded), input_ids[:, Lp:] (shared)
    mask: torch.Tensor  # [B, T] float, 1 on completion tokens the policy sampled (not on
    # a multi-turn episode's environment tokens, which are inputs only: `policy_mask`)
    behaviour_logprobs: torch.Tensor  # [B, T] float32, 0 off-mask
    advantages: torch.Tensor  # [B] float32
    versions: torch.Tensor  # [B] long, policy version that produced each sample
    index: torch.Tensor  # [B] long, position of each sample in the step's batch (-1: an
    # FSDP padding micro-batch's row, no sample of the batch; `learner.plan`)
    prefix: PrefixLayout | None = None  # set: the shared-prefix layout

    def to(self, device: torch.device | str) -> MicroBatch:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return MicroBatch(**{k: None if v is None else v.to(device) for k, v in moved.items()})

    @property
    def num_tokens(self) -> int:
        return int(self.mask.sum().item())


def policy_mask(s: Sample) -> torch.Tensor:
    """[C] float: 1 on the completion tokens the policy sampled, 0 on an environment
    turn's (`Sample.policy_mask`; empty: all the policy's)."""
    C = len(s.completion_ids)
    if not s.policy_mask:
        return torch.ones(C, dtype=torch.float32)  # [C]
    if len(s.policy_mask) != C:
        raise ValueError(
            f"sample {s.row_id}: {C} completion tokens but a policy_mask of {len(s.policy_mask)}"
        )
    return torch.tensor(s.policy_mask, dtype=torch.float32)  # [C]


def _check(s: Sample) -> tuple[int, int]:
    P, C = len(s.prompt_ids), len(s.completion_ids)
    if P == 0:
        raise ValueError(f"sample {s.row_id} (prompt {s.prompt_id}): empty prompt_ids")
    if len(s.behaviour_logprobs) != C:
        raise ValueError(
            f"sample {s.row_id}: {C} completion tokens but {len(s.behaviour_logprobs)} log-probs"
        )
    return P, C


def _per_sample(samples: list[Sample], advantages: list[float], index: list[int]) -> dict:
    return dict(
        advantages=torch.tensor(advantages, dtype=torch.float32),  # [B]
        versions=torch.tensor([s.policy_version for s in samples], dtype=torch.long),  # [B]
        index=torch.tensor(index, dtype=torch.long),  # [B]
    )


def collate(
    samples: list[Sample], advantages: list[float], index: list[int], pad_id: int
) -> MicroBatch:
    """The padded layout (module docstring)."""
    lengths = [len(s.prompt_ids) + len(s.completion_ids) for s in samples]
    L = max(lengths)
    B = len(samples)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)  # [B, L]
    attn = torch.zeros((B, L), dtype=torch.long)  # [B, L]
    mask = torch.zeros((B, L - 1), dtype=torch.float32)  # [B, T]
    blp = torch.zeros((B, L - 1), dtype=torch.float32)  # [B, T]
    for i, s in enumerate(samples):
        P, C = _check(s)
        input_ids[i, :P] = torch.tensor(s.prompt_ids)
        input_ids[i, P : P + C] = torch.tensor(s.completion_ids, dtype=torch.long)
        attn[i, : P + C] = 1
        mask[i, P - 1 : P + C - 1] = policy_mask(s)  # environment tokens: no target
        blp[i, P - 1 : P + C - 1] = torch.tensor(s.behaviour_logprobs, dtype=torch.float32)
    return MicroBatch(
        input_ids=input_ids,
        attention_mask=attn,
        targets=input_ids[:, 1:].clone(),
        mask=mask,
        behaviour_logprobs=blp,
        **_per_sample(samples, advantages, index),
    )


def completion_chunks(
    lens: list[int], max_chunks: int, cost: int = CHUNK_COST_TOKENS
) -> list[list[int]]:
    """Rows split into at most `max_chunks` runs of the completion pass, by completion
    length: the split (of the rows sorted by length) that minimises the padded completion
    tokens, sum of rows x max(2, longest), plus `cost` tokens per extra pass. [[all rows]]
    when splitting does not pay."""
    order = sorted(range(len(lens)), key=lambda i: lens[i])
    w = [max(2, lens[i]) for i in order]
    cuts = [0] + [j for j in range(1, len(w) + 1) if j == len(w) or w[j] != w[j - 1]]
    # best[k][e]: (tokens, previous cut) of the first e sorted rows in k passes
    best: list[dict[int, tuple[int, int]]] = [{0: (0, -1)}]
    for _ in range(max_chunks):
        layer: dict[int, tuple[int, int]] = {}
        for s, (c0, _) in best[-1].items():
            for e in (e for e in cuts if e > s):
                c = c0 + (e - s) * w[e - 1] + cost
                if e not in layer or c < layer[e][0]:
                    layer[e] = (c, s)
        best.append(layer)
    k = min((k for k in range(1, len(best)) if len(w) in best[k]), key=lambda k: best[k][len(w)])
    ends, e = [], len(w)
    while k > 0:
        ends.append(e)
        e, k = best[k][e][1], k - 1
    bounds = [0, *reversed(ends)]
    return [order[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def _chunked(lay: PrefixLayout, lens: list[int], passes: int) -> PrefixLayout:
    chunks = completion_chunks(lens, passes)
    if len(chunks) > 1:
        lay.chunks = [torch.tensor(c, dtype=torch.long) for c in chunks]
        lay.chunk_widths = [max(2, max(lens[i] for i in c)) for c in chunks]
        flat = [i for c in chunks for i in c]
        lay.unsort = torch.argsort(torch.tensor(flat, dtype=torch.long))  # [B]
    return lay


def packed_mask_bytes(samples: list[Sample], element_bytes: int = 1) -> int:
    """The size of `packed_rows`' mask for these samples as one micro-batch: groups x L^2
    elements, L the longest row (a prompt, then its completions but their last tokens),
    `element_bytes` each (1: sdpa's boolean mask; 4: eager's float32,
    `learner.prefix.mask_element_bytes`)."""
    rows = packed_row_lengths(samples)
    return len(rows) * max(rows.values()) ** 2 * element_bytes


def packed_rows(
    samples: list[Sample], group_of: list[int], Lc: int, max_bytes: int, element_bytes: int = 1
) -> PackedRows | None:
    """The micro-batch as packed groups (`PackedRows`), or None when its grouped
    attention mask would take more than `max_bytes` (`packed_mask_bytes`)."""
    if packed_mask_bytes(samples, element_bytes) > max_bytes:
        return None
    n = max(group_of) + 1
    ids: list[list[int]] = [[] for _ in range(n)]
    pos: list[list[int]] = [[] for _ in range(n)]
    seg: list[list[int]] = [[] for _ in range(n)]
    where: list[tuple[int, list[int]]] = []  # (row, local positions behind each target)
    for s, g in zip(samples, group_of, strict=True):
        P = len(s.prompt_ids)
        if not ids[g]:
            ids[g], pos[g], seg[g] = list(s.prompt_ids), list(range(P)), [0] * P
        start, k = len(ids[g]), max(seg[g]) + 1
        inputs = list(s.completion_ids[:-1])
        ids[g] += inputs
        pos[g] += range(P, P + len(inputs))
        seg[g] += [k] * len(inputs)
        where.append((g, [P - 1, *range(start, start + len(inputs))]))
    L = max(len(r) for r in ids)
    input_ids = torch.zeros((n, L), dtype=torch.long)  # [N, L]
    position_ids = torch.zeros((n, L), dtype=torch.long)  # [N, L]
    segments = torch.full((n, L), -1, dtype=torch.long)  # [N, L]
    for g in range(n):
        m = len(ids[g])
        input_ids[g, :m] = torch.tensor(ids[g], dtype=torch.long)
        position_ids[g, :m] = torch.tensor(pos[g], dtype=torch.long)
        segments[g, :m] = torch.tensor(seg[g], dtype=torch.long)
    gather = torch.full((len(samples), Lc), n * L, dtype=torch.long)  # [B, Lc]
    for b, (g, local) in enumerate(where):
        gather[b, : len(local)] = g * L + torch.tensor(local, dtype=torch.long)
    return PackedRows(input_ids, position_ids, segments, gather)


def collate_shared(
    samples: list[Sample],
    advantages: list[float],
    index: list[int],
    pad_id: int,
    completion_passes: int = 1,
    pack_mask_bytes: int = 0,
    mask_element_bytes: int = 1,
) -> MicroBatch:
    """The shared-prefix layout (module docstring). Lc >= 2, so the completion forward
    always runs (every FSDP rank must make the same calls) even for one-token completions.
    `pack_mask_bytes` > 0: packed groups (`packed_rows`) when their mask, at
    `mask_element_bytes` per element, fits that many bytes. Otherwise, `completion_passes` > 1: the completion pass may run in that many
    chunks of similar length (`completion_chunks`; 1 under FSDP, whose ranks must make
    the same calls)."""
    lens = [_check(s) for s in samples]
    Lp = max(p for p, _ in lens)
    Lc = max(2, max(c for _, c in lens))
    B = len(samples)
    input_ids = torch.full((B, Lp + Lc), pad_id, dtype=torch.long)  # [B, Lp + Lc]
    attn = torch.zeros((B, Lp + Lc), dtype=torch.long)  # [B, Lp + Lc]
    mask = torch.zeros((B, Lc), dtype=torch.float32)  # [B, T = Lc]
    blp = torch.zeros((B, Lc), dtype=torch.float32)  # [B, T]
    first: dict[tuple[int, ...], int] = {}  # prompt -> its index in prompt_rows
    prompt_rows, group_of = [], []
    for i, (s, (P, C)) in enumerate(zip(samples, lens, strict=True)):
        key = tuple(s.prompt_ids)
        if key not in first:
            first[key] = len(prompt_rows)
            prompt_rows.append(i)
        group_of.append(first[key])
        input_ids[i, :P] = torch.tensor(s.prompt_ids, dtype=torch.long)
        input_ids[i, Lp : Lp + C] = torch.tensor(s.completion_ids, dtype=torch.long)
        attn[i, :P] = 1
        attn[i, Lp : Lp + C] = 1
        mask[i, :C] = policy_mask(s)  # environment tokens: no target
        blp[i, :C] = torch.tensor(s.behaviour_logprobs, dtype=torch.float32)
    prefix = PrefixLayout(
        prompt_rows=torch.tensor(prompt_rows, dtype=torch.long),  # [N]
        group_of=torch.tensor(group_of, dtype=torch.long),  # [B]
        prompt_lens=torch.tensor([p for p, _ in lens], dtype=torch.long),  # [B]
        prompt_width=Lp,
    )
    if pack_mask_bytes > 0:
        prefix.packed = packed_rows(samples, group_of, Lc, pack_mask_bytes, mask_element_bytes)
    if completion_passes > 1 and prefix.packed is None:
        prefix = _chunked(prefix, [c for _, c in lens], completion_passes)
    return MicroBatch(
        input_ids=input_ids,
        attention_mask=attn,
        targets=input_ids[:, Lp:].clone(),
        mask=mask,
        behaviour_logprobs=blp,
        prefix=prefix,
        **_per_sample(samples, advantages, index),
    )


def collate_packs(
    samples: list[Sample],
    advantages: list[float],
    packs: list[list[int]],
    pad_id: int,
    shared: bool,
    completion_passes: int = 1,
    pack_mask_bytes: int = 0,
    mask_element_bytes: int = 1,
) -> list[MicroBatch]:
    def make(ix: list[int]) -> MicroBatch:
        ss, advs = [samples[i] for i in ix], [advantages[i] for i in ix]
        if shared:
            return collate_shared(
                ss, advs, ix, pad_id, completion_passes, pack_mask_bytes, mask_element_bytes
            )
        return collate(ss, advs, ix, pad_id)

    return [make(ix) for ix in packs]


def make_micro_batches(
    samples: list[Sample],
    advantages: list[float],
    size: int,
    pad_id: int,
    order: list[int],
    *,
    max_tokens: int | None = None,
    shared_prefix: bool = False,
) -> list[MicroBatch]:
    """Split the step's samples (in `order`) into micro-batches: at most `size` sequences
    each, or, with `max_tokens`, sorted by length and at most `max_tokens` forward tokens
    each (`split.forward_tokens`; one sample over the budget gets a micro-batch of its
    own). In the shared-prefix layout (on the KV cache) a prompt's group stays whole where
    it fits. The gradient does not depend on the split (batch-global normalisers)."""
    layout = "cached" if shared_prefix else "padded"
    packs = pack_indices(samples, size, order, max_tokens, layout)
    return collate_packs(samples, advantages, packs, pad_id, shared_prefix)
