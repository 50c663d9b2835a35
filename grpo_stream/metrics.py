"""Per-step metrics: JSONL (always), TensorBoard (when installed), one console line.

`MetricsWriter(run_dir).log(step, metrics)` appends one JSON object per learner step
to `RUN/metrics.jsonl`, mirrors scalars to TensorBoard under `RUN/tb`, and prints
the line a person watches: step, reward mean/std, KL, clip fraction, tokens/s,
staleness.
"""

from __future__ import annotations

import json
import math
import os
import sys


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class MetricsWriter:
    def __init__(self, run_dir: str, tensorboard: bool = True):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(os.path.join(run_dir, "tb"))
            except Exception:  # tensorboard missing or broken: JSONL is the record
                self._tb = None

    def log(self, metrics: dict) -> None:
        row = {k: _clean(v) for k, v in metrics.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, int | float) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, metrics["step"])
            self._tb.flush()
        print(format_line(metrics), flush=True)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def format_line(m: dict) -> str:
    return (
        f"step {m['step']:4d} | reward {m['reward_mean']:.3f} ± {m['reward_std']:.3f} "
        f"| kl {m['kl']:.4f} | clip {m['clip_frac']:.3f} | tok/s {m['tokens_per_s']:7.1f} "
        f"| stale {m['staleness_mean']:.2f} | v{m['policy_version']}"
    )


def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no metrics (is {run_dir} a run folder?)")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
