"""Train a Bradley–Terry reward model and score pairs with one (`grpo-stream rm train|eval`).

    model, tok = load_reward_model("smollm2-135m")            # base: a causal LM folder
    report = train_reward_model(model, tok, train, held, TrainSettings(epochs=2))
    save_reward_model(model, tok, "runs/rm", report)           # an HF folder, published atomically
    acc = evaluate_pairs(model, tok, pairs, max_len)           # held-out pairwise accuracy

The model is `AutoModelForSequenceClassification` with one label, initialised from the
base (its `score` head new), with `pad_token_id` set so transformers can batch it and
vLLM's pooling runner serves it. A sequence's score is the `score` head on the hidden
state of its last token, computed here from the backbone by each sequence's length:
what vLLM's LAST pooling computes, whatever the pad token is. Inputs are rendered by
`grpo_stream.tasks.reward_model.rm_input_ids`, as the `reward_model` reward renders
them; a pair with a side longer than `max_len` tokens is left out and counted.
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from grpo_stream.algo.bradley_terry import bradley_terry_loss, pairwise_accuracy
from grpo_stream.core.atomic import fresh_dir, publish_dir
from grpo_stream.rm.pairs import Pair, PairsError
from grpo_stream.tasks.reward_model import rm_input_ids

METRICS_FILE = "rm_metrics.json"


@dataclass(frozen=True)
class TrainSettings:
    epochs: int = 1
    batch_pairs: int = 8
    lr: float = 1e-5
    weight_decay: float = 0.0
    max_len: int = 1024
    seed: int = 0
    log_every: int = 10  # steps between progress lines


@dataclass
class TrainReport:
    pairs_train: int = 0
    pairs_heldout: int = 0
    dropped_too_long: int = 0
    steps: int = 0
    train_accuracy: float = float("nan")  # over the last epoch's batches
    heldout_accuracy: float = float("nan")
    heldout_accuracy_before: float = float("nan")  # the untrained head: chance level
    history: list[dict[str, float]] = field(default_factory=list)


def load_reward_model(base: str | Path) -> tuple[Any, Any]:
    """A one-label classifier from `base` (a classifier folder, or a causal LM whose
    backbone it reuses), float32, with `pad_token_id` set; and its tokenizer."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=1, torch_dtype=torch.float32
    )
    model.config.pad_token_id = tok.pad_token_id
    return model, tok


def encode_pairs(tok: Any, pairs: list[Pair], max_len: int) -> tuple[list[tuple], int]:
    """[(chosen ids, rejected ids)] for the pairs that fit in `max_len`; and how many did not."""
    out, dropped = [], 0
    for p in pairs:
        c = rm_input_ids(tok, [*p.prompt, *p.chosen])
        r = rm_input_ids(tok, [*p.prompt, *p.rejected])
        if max(len(c), len(r)) > max_len:
            dropped += 1
        else:
            out.append((c, r))
    return out, dropped


def sequence_scores(model: Any, seqs: list[list[int]], pad_id: int) -> torch.Tensor:
    """The score head on each sequence's last token: [B]."""
    lengths = torch.tensor([len(s) for s in seqs])  # [B]
    width = int(lengths.max())
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # [B, T]
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()  # [B, T]
    hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state  # [B,T,H]
    last = hidden[torch.arange(len(seqs)), lengths - 1]  # [B, H]
    return model.score(last).squeeze(-1)  # [B]


@torch.no_grad()
def score_encoded(model: Any, encoded: list[tuple], pad_id: int, batch: int = 16) -> tuple:
    """(chosen scores, rejected scores) as lists, in batches, without gradients."""
    model.eval()
    chosen: list[float] = []
    rejected: list[float] = []
    for k in range(0, len(encoded), batch):
        part = encoded[k : k + batch]
        chosen += sequence_scores(model, [c for c, _ in part], pad_id).tolist()
        rejected += sequence_scores(model, [r for _, r in part], pad_id).tolist()
    return chosen, rejected


def evaluate_pairs(model: Any, tok: Any, pairs: list[Pair], max_len: int) -> tuple[float, int]:
    """(pairwise accuracy, pairs scored) of `model` on `pairs`."""
    encoded, _ = encode_pairs(tok, pairs, max_len)
    if not encoded:
        raise PairsError(f"no pair fits in {max_len} tokens")
    c, r = score_encoded(model, encoded, tok.pad_token_id)
    return pairwise_accuracy(c, r), len(encoded)


def _step(model: Any, opt: Any, batch: list[tuple], pad_id: int) -> dict[str, float]:
    model.train()
    chosen = sequence_scores(model, [c for c, _ in batch], pad_id)  # [P]
    rejected = sequence_scores(model, [r for _, r in batch], pad_id)  # [P]
    loss, metrics = bradley_terry_loss(chosen, rejected)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return metrics


def train_reward_model(
    model: Any, tok: Any, train: list[Pair], held: list[Pair], s: TrainSettings, log=None
) -> TrainReport:
    """Bradley–Terry training on `train`; held-out accuracy before and after."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    torch.manual_seed(s.seed)
    enc_train, drop_t = encode_pairs(tok, train, s.max_len)
    enc_held, drop_h = encode_pairs(tok, held, s.max_len)
    if not enc_train:
        raise PairsError(f"no training pair fits in {s.max_len} tokens (max_len)")
    report = TrainReport(len(enc_train), len(enc_held), drop_t + drop_h)
    pad = tok.pad_token_id
    if enc_held:
        report.heldout_accuracy_before = pairwise_accuracy(*score_encoded(model, enc_held, pad))
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    rng = random.Random(s.seed)
    per_epoch = -(-len(enc_train) // s.batch_pairs)
    for epoch in range(s.epochs):
        order = list(range(len(enc_train)))
        rng.shuffle(order)
        right = 0.0
        for k in range(0, len(order), s.batch_pairs):
            batch = [enc_train[i] for i in order[k : k + s.batch_pairs]]
            m = _step(model, opt, batch, pad)
            report.steps += 1
            right += m["accuracy"] * len(batch)
            report.history.append({"step": report.steps, **m})
            if report.steps % s.log_every == 0 or report.steps == s.epochs * per_epoch:
                log(f"[rm] epoch {epoch + 1}/{s.epochs} step {report.steps}/"
                    f"{s.epochs * per_epoch} loss {m['loss']:.4f} acc {m['accuracy']:.3f}")  # fmt: skip
        report.train_accuracy = right / len(enc_train)
    if enc_held:
        report.heldout_accuracy = pairwise_accuracy(*score_encoded(model, enc_held, pad))
    return report


def save_reward_model(model: Any, tok: Any, out_dir: str | Path, report: TrainReport) -> Path:
    """The HF folder (safetensors, tokenizer, `rm_metrics.json`), published atomically."""
    out = Path(out_dir)
    tmp = fresh_dir(out.with_name(out.name + ".tmp"))
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / METRICS_FILE).write_text(json.dumps(asdict(report), indent=1) + "\n")
    return publish_dir(tmp, out)
