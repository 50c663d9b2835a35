"""A learner step's micro-batches: which layout (shared prefix or padded) and which split.

    mbs = plan_micro_batches(samples, advantages, cfg.learner, pad_id, model, world)

* `learner.shared_prefix`: false → padded; true → shared prefix wherever the model
  supports it (`learner.prefix.unsupported_reason`; otherwise padded, logged once);
  "auto" → shared prefix when it saves at least `AUTO_MIN_SAVED_PACKED` of the forward
  tokens and every micro-batch fits the packed groups' mask, else `AUTO_MIN_SAVED`.
* `learner.micro_batch_size` / `learner.micro_batch_tokens`: at most that many sequences,
  or forward tokens in the layout the step runs (`learner.split`); a group larger than
  that runs in parts, its prompt once in each (logged once).
* `learner.pack_mask_mib`: a shared-prefix micro-batch runs as one forward of packed
  groups (`batch.PackedRows`) while its grouped attention mask fits, counted at the
  model's bytes per element (1 sdpa, 4 eager: `prefix.mask_element_bytes`); otherwise on
  the prompts' KV cache, its completions in up to `learner.completion_passes` passes.
* Under torchrun every rank must make the same model calls: the layout is shared only if
  every rank chooses it, groups are packed only if every rank's micro-batches all are,
  the completion pass is not split by length (`learner.completion_passes`, one process
  only), and ranks with fewer micro-batches cut theirs at group boundaries, then add
  zero-token padding micro-batches (`_split_to`; a group is never cut for this). FSDP
  padding samples (`distributed.is_padding`) go in no micro-batch.
"""

from __future__ import annotations

from grpo_stream.buffer.schema import Sample
from grpo_stream.learner.batch import (
    MicroBatch,
    collate,
    collate_packs,
    collate_shared,
    packed_mask_bytes,
)
from grpo_stream.learner.distributed import (
    all_reduce_scalars,
    is_padding,
    padding_sample,
    print0,
    unwrap,
)
from grpo_stream.learner.prefix import mask_element_bytes, unsupported_reason
from grpo_stream.learner.split import pack_indices

# "auto" takes the shared-prefix forward when it skips at least this share of the padded
# layout's tokens (`python -m bench.learner --part sweep`: SmolLM2-135M fp32 on 2 CPU
# cores, 1 group of 8, completions of 4..16 tokens, padded / shared step time against
# the saving; bench/results/learner.json config.sweep). On the KV-cache path (session 5,
# two passes) 1.01 at a saving of 0.165, 1.15 at 0.359, 1.31 at 0.569: break-even near
# 0.17, so AUTO_MIN_SAVED = 0.25 keeps a margin. Packed groups (one pass, no padding
# between completions) 1.39 at 0.091 (prompts of 1 token), 1.25 at 0.165, 1.41 at 0.359,
# 1.76 at 0.569: no break-even in range, so a small floor while every micro-batch packs.
AUTO_MIN_SAVED = 0.25
AUTO_MIN_SAVED_PACKED = 0.05

_reported: set[str] = set()


def shared_prefix_saving(samples: list[Sample]) -> float:
    """1 - (each distinct prompt once + every completion) / (every prompt + completion)."""
    padded = sum(len(s.prompt_ids) + len(s.completion_ids) for s in samples)
    prompts = {tuple(s.prompt_ids) for s in samples}
    shared = sum(len(p) for p in prompts) + sum(len(s.completion_ids) for s in samples)
    return 1.0 - shared / max(padded, 1)


def _report(msg: str) -> None:
    if msg not in _reported:  # one line per reason, not one per step
        _reported.add(msg)
        print0(msg)


def use_shared_prefix(
    setting: str | bool, samples: list[Sample], model, packable: bool = False
) -> bool:
    """Whether this rank's step runs in the shared-prefix layout (`setting`: see module doc;
    `packable`: every micro-batch would run as packed groups)."""
    if setting is False or setting == "false":
        return False
    reason = unsupported_reason(unwrap(model))
    if reason is not None:
        _report(f"[learner] shared-prefix forward off, padded layout instead: {reason}")
        return False
    least = AUTO_MIN_SAVED_PACKED if packable else AUTO_MIN_SAVED
    return setting is True or setting == "true" or shared_prefix_saving(samples) >= least


def _split_to(packs: list[list[int]], count: int, key) -> tuple[list[list[int]], int]:
    """Cut the micro-batch of the most units (`key(i)`: sample i's unit, its prompt in
    the shared-prefix layouts, itself in the padded one) in two at a unit boundary until
    there are `count`; returns them and how many padding micro-batches must still make up
    the count (when every one holds a single unit: a group is never cut)."""
    packs = [list(p) for p in packs]
    while len(packs) < count:
        runs = [list(_runs(p, key).values()) for p in packs]
        big = max(range(len(packs)), key=lambda i: len(runs[i]), default=None)
        if big is None or len(runs[big]) < 2:
            break
        half = len(runs[big]) // 2
        packs[big : big + 1] = [sum(runs[big][:half], []), sum(runs[big][half:], [])]
    return packs, count - len(packs)


def _runs(pack: list[int], key) -> dict:
    out: dict = {}
    for i in pack:
        out.setdefault(key(i), []).append(i)
    return out


def _padding_micro_batch(like: Sample, pad_id: int, layout: str) -> MicroBatch:
    """A zero-token micro-batch (one `padding_sample`, index -1) in `layout`, for a rank
    that has fewer micro-batches than another: the same model calls, nothing learnt."""
    pad = padding_sample(like)
    if layout == "padded":
        return collate([pad], [0.0], [-1], pad_id)
    return collate_shared([pad], [0.0], [-1], pad_id, 1, 1 << 30 if layout == "packed" else 0)


def _layout(samples: list[Sample], real: list[int], lc, model, world: int) -> tuple[str, int]:
    """("padded" | "cached" | "packed", the mask's bytes per element) of this step, agreed
    by every rank."""
    elem = mask_element_bytes(unwrap(model))
    mask_bytes = int(lc.pack_mask_mib * 2**20)
    packs = pack_indices(samples, lc.micro_batch_size, real, lc.micro_batch_tokens, "packed")
    packable = mask_bytes > 0 and all(
        packed_mask_bytes([samples[i] for i in p], elem) <= mask_bytes for p in packs
    )  # cutting a micro-batch (`_split_to`) only shrinks its mask
    shared = use_shared_prefix(lc.shared_prefix, [samples[i] for i in real], model, packable)
    if world > 1:  # same layout and number of forward calls on every rank
        # every rank joins this collective: one whose shard does not pay off (auto) must
        # still vote, or the ranks' collectives fall out of step; packed is one forward
        # per micro-batch, the KV cache two, so packing needs every rank too
        votes = all_reduce_scalars({"shared": float(shared), "packed": float(packable)}, "min")
        shared, packable = shared and bool(votes["shared"]), bool(votes["packed"])
    return ("packed" if packable else "cached") if shared else "padded", elem


def _report_cut_groups(samples: list[Sample], packs: list[list[int]], lc) -> None:
    homes: dict[tuple[int, ...], int] = {}
    for k, p in enumerate(packs):
        for i in p:
            if homes.setdefault(tuple(samples[i].prompt_ids), k) != k:
                bound = (f"micro_batch_tokens = {lc.micro_batch_tokens}" if lc.micro_batch_tokens
                         else f"micro_batch_size = {lc.micro_batch_size}")  # fmt: skip
                _report(f"[learner] a group larger than one micro-batch (learner.{bound}) "
                        "runs in parts, its prompt once in each")  # fmt: skip
                return


def plan_micro_batches(
    samples: list[Sample], advantages: list[float], lc, pad_id: int, model, world: int = 1
) -> list[MicroBatch]:
    """This rank's micro-batches for one step (`lc`: the LearnerConfig)."""
    # FSDP padding samples go in no micro-batch; a shard of nothing else runs its first
    real = [i for i, s in enumerate(samples) if not is_padding(s)] or [0]
    layout, elem = _layout(samples, real, lc, model, world)
    packs = pack_indices(samples, lc.micro_batch_size, real, lc.micro_batch_tokens, layout)
    if layout != "padded":
        _report_cut_groups(samples, packs, lc)
    pads = 0
    if world > 1:
        most = int(all_reduce_scalars({"count": float(len(packs))}, "max")["count"])
        if layout == "padded":
            packs, pads = _split_to(packs, most, lambda i: i)
        else:
            packs, pads = _split_to(packs, most, lambda i: tuple(samples[i].prompt_ids))
    # chunks by completion length would give ranks different numbers of forward calls
    passes = lc.completion_passes if world == 1 else 1
    mask_bytes = int(lc.pack_mask_mib * 2**20) if layout == "packed" else 0
    mbs = collate_packs(
        samples, advantages, packs, pad_id, layout != "padded", passes, mask_bytes, elem
    )
    return mbs + [_padding_micro_batch(samples[0], pad_id, layout) for _ in range(pads)]
