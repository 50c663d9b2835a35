"""`grpo-stream rm train | eval`: reward models without a hub.

    grpo-stream rm train --run runs/demo-... --out runs/rm           # pairs mined from a buffer
    grpo-stream rm train --run runs/a --run runs/b --out runs/rm     # from several runs
    grpo-stream rm train --pairs prefs.jsonl --base smollm2-135m --out runs/rm
    grpo-stream rm eval --model runs/rm --pairs prefs.jsonl [--json acc.json]

`train` splits the pairs by prompt into train and held-out (`--heldout`), trains with
the Bradley–Terry loss (`grpo_stream.rm.train`), prints progress and the held-out
pairwise accuracy, and writes the model folder with `rm_metrics.json` beside the
weights; `[reward_model] path` can then name it. `eval` prints one pairs file's
pairwise accuracy under a model folder.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from grpo_stream.config import ModelConfig


def _train_parser(sub) -> None:
    t = sub.add_parser("train", help="train a Bradley-Terry reward model")
    src = t.add_mutually_exclusive_group(required=True)
    src.add_argument("--pairs", type=Path, help="JSONL of {prompt, chosen, rejected}")
    src.add_argument("--run", action="append",
                     help="a run folder: pairs mined within its buffer's groups (repeatable)")  # fmt: skip
    t.add_argument("--base", default="smollm2-135m", help="model to start from (path)")
    t.add_argument("--out", type=Path, required=True, help="the reward model folder to write")
    t.add_argument("--heldout", type=float, default=0.2, help="share of prompts held out")
    t.add_argument("--epochs", type=int, default=1)
    t.add_argument("--batch-pairs", type=int, default=8)
    t.add_argument("--lr", type=float, default=1e-5)
    t.add_argument("--max-len", type=int, default=1024, help="longest input (tokens)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--log-every", type=int, default=10, help="steps between progress lines")
    t.add_argument("--min-margin", type=float, default=0.0, help="--run: least reward gap")
    t.add_argument("--max-pairs-per-group", type=int, default=8, help="--run: pairs per group")
    t.add_argument("--reward-key", default=None, help="--run: a reward component, not the total")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="grpo-stream rm", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="action", required=True)
    _train_parser(sub)
    e = sub.add_parser("eval", help="pairwise accuracy of a reward model on a pairs file")
    e.add_argument("--model", type=Path, required=True, help="reward model folder")
    e.add_argument("--pairs", type=Path, required=True, help="JSONL of {prompt, chosen, rejected}")
    e.add_argument("--max-len", type=int, default=1024)
    e.add_argument("--json", type=Path, default=None, help="also write the result here")
    return p


def _pairs(args) -> list:
    if args.pairs is not None:
        from grpo_stream.rm.pairs import load_pairs_jsonl

        return load_pairs_jsonl(args.pairs)
    from grpo_stream.rm.run_pairs import pairs_from_runs

    return pairs_from_runs(args.run, args.min_margin, args.max_pairs_per_group, args.reward_key)


def cmd_train(args) -> int:
    from grpo_stream.rm.pairs import split_by_prompt
    from grpo_stream.rm.train import (
        TrainSettings,
        load_reward_model,
        save_reward_model,
        train_reward_model,
    )
    from grpo_stream.serving.model import resolve_model_path

    pairs = _pairs(args)
    train, held = split_by_prompt(pairs, args.heldout, args.seed)
    print(f"[rm] {len(pairs)} pairs: {len(train)} train, {len(held)} held out (by prompt)")
    base = resolve_model_path(ModelConfig(path=args.base))
    model, tok = load_reward_model(base)
    s = TrainSettings(args.epochs, args.batch_pairs, args.lr, 0.0, args.max_len, args.seed,
                      args.log_every)  # fmt: skip
    report = train_reward_model(model, tok, train, held, s)
    out = save_reward_model(model, tok, args.out, report)
    before, after = report.heldout_accuracy_before, report.heldout_accuracy
    shown = "n/a (no held-out pairs)" if math.isnan(after) else f"{after:.3f} (before {before:.3f})"
    print(f"[rm] held-out pairwise accuracy {shown}; train {report.train_accuracy:.3f}")
    print(f"[rm] wrote {out} ({out / 'rm_metrics.json'})")
    return 0


def cmd_eval(args) -> int:
    from grpo_stream.rm.pairs import load_pairs_jsonl
    from grpo_stream.rm.train import evaluate_pairs, load_reward_model
    from grpo_stream.serving.rm_server import check_classifier

    check_classifier(str(args.model))
    model, tok = load_reward_model(args.model)
    acc, n = evaluate_pairs(model, tok, load_pairs_jsonl(args.pairs), args.max_len)
    print(f"[rm] {args.pairs}: pairwise accuracy {acc:.3f} over {n} pairs")
    if args.json is not None:
        result = {"model": str(args.model), "pairs": str(args.pairs), "accuracy": acc, "n": n}
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


def rm_cli(argv: list[str] | None = None) -> int:
    """`grpo-stream rm ...`; a UserError reaches the entry point (one line, status 2)."""
    args = _parser().parse_args(argv)
    return cmd_train(args) if args.action == "train" else cmd_eval(args)
