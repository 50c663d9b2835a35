"""Groups from the buffer → padded tensors the learner trains on.

A sequence is prompt + completion, right-padded to the longest in its micro-batch.
Log-probs are indexed by *target* position: column j holds log p(x[j+1] | x[:j+1]),
so a completion that starts at token P occupies target columns P-1 .. P+C-2. The
`mask` is 1 exactly there; behaviour log-probs from vLLM are placed in the same
columns, so every [B, T] tensor lines up.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from grpo_stream.buffer.schema import Sample


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # [B, L] long
    attention_mask: torch.Tensor  # [B, L] long
    targets: torch.Tensor  # [B, T=L-1] long, input_ids[:, 1:]
    mask: torch.Tensor  # [B, T] float, 1 on completion tokens
    behaviour_logprobs: torch.Tensor  # [B, T] float32, 0 off-mask
    advantages: torch.Tensor  # [B] float32
    versions: torch.Tensor  # [B] long, policy version that produced each sample
    index: torch.Tensor  # [B] long, position of each sample in the step's batch

    def to(self, device: torch.device | str) -> MicroBatch:
        return MicroBatch(**{k: v.to(device) for k, v in self.__dict__.items()})

    @property
    def num_tokens(self) -> int:
        return int(self.mask.sum().item())


def collate(
    samples: list[Sample], advantages: list[float], index: list[int], pad_id: int
) -> MicroBatch:
    lengths = [len(s.prompt_ids) + len(s.completion_ids) for s in samples]
    L = max(lengths)
    B = len(samples)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)  # [B, L]
    attn = torch.zeros((B, L), dtype=torch.long)  # [B, L]
    mask = torch.zeros((B, L - 1), dtype=torch.float32)  # [B, T]
    blp = torch.zeros((B, L - 1), dtype=torch.float32)  # [B, T]
    for i, s in enumerate(samples):
        P, C = len(s.prompt_ids), len(s.completion_ids)
        if P == 0:
            raise ValueError(f"sample {s.row_id} (prompt {s.prompt_id}): empty prompt_ids")
        if len(s.behaviour_logprobs) != C:
            raise ValueError(
                f"sample {s.row_id}: {C} completion tokens but {len(s.behaviour_logprobs)} log-probs"
            )
        input_ids[i, :P] = torch.tensor(s.prompt_ids)
        input_ids[i, P : P + C] = torch.tensor(s.completion_ids, dtype=torch.long)
        attn[i, : P + C] = 1
        mask[i, P - 1 : P + C - 1] = 1.0
        blp[i, P - 1 : P + C - 1] = torch.tensor(s.behaviour_logprobs, dtype=torch.float32)
    return MicroBatch(
        input_ids=input_ids,
        attention_mask=attn,
        targets=input_ids[:, 1:].clone(),
        mask=mask,
        behaviour_logprobs=blp,
        advantages=torch.tensor(advantages, dtype=torch.float32),
        versions=torch.tensor([s.policy_version for s in samples], dtype=torch.long),
        index=torch.tensor(index, dtype=torch.long),
    )


def make_micro_batches(
    samples: list[Sample], advantages: list[float], size: int, pad_id: int, order: list[int]
) -> list[MicroBatch]:
    """Split the step's samples (in `order`) into micro-batches of at most `size`."""
    out = []
    for start in range(0, len(order), size):
        idx = order[start : start + size]
        out.append(collate([samples[i] for i in idx], [advantages[i] for i in idx], idx, pad_id))
    return out
