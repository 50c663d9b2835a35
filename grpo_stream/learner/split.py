"""Which samples share a micro-batch: at most `learner.micro_batch_size` sequences, or at
most `learner.micro_batch_tokens` forward tokens, in the layout the step runs.

    packs = pack_indices(samples, size, order, max_tokens, layout)  # sample indices per micro-batch

`layout` is what one forward of the micro-batch processes (`forward_tokens`, padding
counted): "padded" (`batch.collate`: every row prompt + completion, B x L), "cached"
(`batch.collate_shared` on the prompts' KV cache: N x Lp prompt tokens, then B x Lc) or
"packed" (`collate_shared` with packed groups: N rows of a prompt then each of its
completions' inputs, N x L). In the two shared-prefix layouts a group (the rows with one
prompt) stays in one micro-batch, unless the group alone exceeds the bound: then it is
cut, in order, into the fewest parts that each fit, and each part runs its prompt once
(the bound is a memory promise; raise it to the group's size to share the prompt fully).
A single sample over the token budget gets a micro-batch of its own.
"""

from __future__ import annotations

from collections.abc import Callable

from grpo_stream.buffer.schema import Sample

LAYOUTS = ("padded", "cached", "packed")


def packed_row_lengths(samples: list[Sample]) -> dict[tuple[int, ...], int]:
    """Each distinct prompt's packed row length: the prompt, then every completion's
    inputs (its tokens but the last, which is only a target)."""
    rows: dict[tuple[int, ...], int] = {}
    for s in samples:
        key = tuple(s.prompt_ids)
        rows[key] = rows.get(key, len(key)) + max(len(s.completion_ids) - 1, 0)
    return rows


def forward_tokens(samples: list[Sample], layout: str) -> int:
    """Tokens one forward of these samples as a micro-batch processes in `layout`, padding
    counted: B x L (padded); N x Lp + B x max(2, Lc) (cached: each distinct prompt once,
    the completions at least 2 wide); N x L (packed: L the longest packed row)."""
    if layout not in LAYOUTS:
        raise ValueError(f"forward_tokens: layout {layout!r} not in {LAYOUTS}")
    if layout == "padded":
        return len(samples) * max(len(s.prompt_ids) + len(s.completion_ids) for s in samples)
    if layout == "packed":
        rows = packed_row_lengths(samples)
        return len(rows) * max(rows.values())
    P = max(len(s.prompt_ids) for s in samples)
    C = max(len(s.completion_ids) for s in samples)
    return len({tuple(s.prompt_ids) for s in samples}) * P + len(samples) * max(2, C)


def units(samples: list[Sample], order: list[int], shared: bool) -> list[list[int]]:
    """Indices that share a micro-batch where they fit: single samples, or (shared) whole
    prompt groups in order of first appearance."""
    if not shared:
        return [[i] for i in order]
    groups: dict[tuple[int, ...], list[int]] = {}
    for i in order:
        groups.setdefault(tuple(samples[i].prompt_ids), []).append(i)
    return list(groups.values())


def _cut(unit: list[int], fits: Callable[[list[int]], bool]) -> list[list[int]]:
    """`unit` whole if it fits, else in order into parts that each fit (a sample that does
    not fit alone is a part of its own)."""
    if fits(unit):
        return [unit]
    parts: list[list[int]] = [[]]
    for i in unit:
        if parts[-1] and not fits(parts[-1] + [i]):
            parts.append([])
        parts[-1].append(i)
    return parts


def _pack(units: list[list[int]], fits: Callable[[list[int]], bool]) -> list[list[int]]:
    """Greedy: add units to the current micro-batch while `fits(indices)`; a unit that does
    not fit alone gets a micro-batch of its own."""
    packs: list[list[int]] = []
    for u in units:
        if packs and fits(packs[-1] + u):
            packs[-1] = packs[-1] + u
        else:
            packs.append(list(u))
    return packs


def pack_indices(
    samples: list[Sample],
    size: int,
    order: list[int],
    max_tokens: int | None = None,
    layout: str = "padded",
) -> list[list[int]]:
    """The sample indices of each micro-batch (module docstring): at most `size`
    sequences each, or with `max_tokens` sorted by length and at most that many
    `forward_tokens` in `layout` each; groups whole where they fit (shared layouts)."""
    if layout not in LAYOUTS:
        raise ValueError(f"pack_indices: layout {layout!r} not in {LAYOUTS}")
    if max_tokens is None:

        def fits(idx: list[int]) -> bool:
            return len(idx) <= size
    else:

        def fits(idx: list[int]) -> bool:
            return forward_tokens([samples[i] for i in idx], layout) <= max_tokens

    parts = [p for u in units(samples, order, layout != "padded") for p in _cut(u, fits)]
    if max_tokens is not None:

        def length(u: list[int]) -> tuple[int, int]:
            ss = [samples[i] for i in u]
            return max(len(s.prompt_ids) for s in ss), max(len(s.completion_ids) for s in ss)

        parts = sorted(parts, key=lambda u: (sum(length(u)), length(u)))  # stable
    return _pack(parts, fits)
