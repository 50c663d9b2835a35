"""A learner step's micro-batches: which layout (shared prefix or padded) and which split.

    mbs = plan_micro_batches(samples, advantages, cfg.learner, pad_id, model, world)

* `learner.shared_prefix`: false → padded; true → shared prefix wherever the model
  supports it (`learner.prefix.unsupported_reason`; otherwise padded, logged once);
  "auto" → shared prefix when it saves at least `AUTO_MIN_SAVED_PACKED` of the forward
  tokens and every micro-batch fits the packed groups' mask, else `AUTO_MIN_SAVED`.
* `learner.micro_batch_tokens`: micro-batches packed by token budget instead of
  `micro_batch_size` sequences (`batch.make_micro_batches`).
* `learner.pack_mask_mib`: a shared-prefix micro-batch runs as one forward of packed
  groups (`batch.PackedRows`) while its grouped attention mask fits; otherwise on the
  prompts' KV cache, its completions in up to `learner.completion_passes` passes.
* Under torchrun every rank must make the same model calls: the layout is shared only if
  every rank chooses it, ranks with fewer micro-batches split their largest ones, groups
  are packed only if every rank's micro-batches all are, and the completion pass is not
  split by length (`learner.completion_passes`, one process only).
"""

from __future__ import annotations

from grpo_stream.buffer.schema import Sample
from grpo_stream.learner.batch import MicroBatch, collate_packs, pack_indices, packed_mask_bytes
from grpo_stream.learner.distributed import all_reduce_scalars, print0, unwrap
from grpo_stream.learner.prefix import unsupported_reason

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


def _split_to(packs: list[list[int]], count: int) -> list[list[int]]:
    """Halve the largest micro-batches until there are `count` (each keeps >= 1 sample)."""
    packs = [list(p) for p in packs]
    while len(packs) < count:
        big = max(range(len(packs)), key=lambda i: len(packs[i]))
        if len(packs[big]) < 2:
            raise RuntimeError(f"cannot split {len(packs)} micro-batches into {count}")
        half = len(packs[big]) // 2
        packs[big : big + 1] = [packs[big][:half], packs[big][half:]]
    return packs


def plan_micro_batches(
    samples: list[Sample], advantages: list[float], lc, pad_id: int, model, world: int = 1
) -> list[MicroBatch]:
    """This rank's micro-batches for one step (`lc`: the LearnerConfig)."""
    order, size, budget = list(range(len(samples))), lc.micro_batch_size, lc.micro_batch_tokens
    packs = pack_indices(samples, size, order, budget, True)
    mask_bytes = int(lc.pack_mask_mib * 2**20)
    packable = mask_bytes > 0 and all(
        packed_mask_bytes([samples[i] for i in p]) <= mask_bytes for p in packs
    )  # splitting a micro-batch (`_split_to`) only shrinks its mask
    shared = use_shared_prefix(lc.shared_prefix, samples, model, packable)
    if world > 1:  # same layout and number of forward calls on every rank
        # every rank joins this collective: one whose shard does not pay off (auto) must
        # still vote, or the ranks' collectives fall out of step; packed is one forward
        # per micro-batch, the KV cache two, so packing needs every rank too
        votes = all_reduce_scalars({"shared": float(shared), "packed": float(packable)}, "min")
        shared, packable = shared and bool(votes["shared"]), bool(votes["packed"])
    if not shared:
        packs = pack_indices(samples, size, order, budget)
    if world > 1:
        most = all_reduce_scalars({"count": float(len(packs))}, "max")["count"]
        packs = _split_to(packs, int(most))
    # chunks by completion length would give ranks different numbers of forward calls
    passes = lc.completion_passes if world == 1 else 1
    return collate_packs(
        samples, advantages, packs, pad_id, shared, passes, mask_bytes if packable else 0
    )
