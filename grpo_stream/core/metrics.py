"""Per-step metrics: JSONL (always), TensorBoard (when installed), one console line.

`MetricsWriter(run_dir).log(row)` appends one JSON object per learner step to
`RUN/metrics.jsonl`, mirrors its scalars to TensorBoard under `RUN/tb` (one tag per
key), and prints the line a person watches: step, reward mean/std, KL, clip fraction,
tokens/s, staleness, policy version. The keys are the names in
`grpo_stream.core.metric_names`; `read_metrics` reads the file back.
"""

from __future__ import annotations

import math
import os

from grpo_stream.core import jsonl
from grpo_stream.core import metric_names as M


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
        jsonl.append(self.path, row)
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, int | float) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, metrics[M.STEP])
            self._tb.flush()
        print(format_line(metrics), flush=True)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def format_line(m: dict) -> str:
    """The console line of one metrics row (a missing value shows as nan)."""
    nan = float("nan")
    g = {k: nan if m.get(k) is None else m[k] for k in LINE_KEYS}
    return (
        f"step {m[M.STEP]:4d} | reward {g[M.REWARD_MEAN]:.3f} ± {g[M.REWARD_STD]:.3f} "
        f"| kl {g[M.KL]:.4f} | clip {g[M.CLIP_FRAC]:.3f} | tok/s {g[M.TOKENS_PER_S]:7.1f} "
        f"| stale {g[M.STALENESS_MEAN]:.2f} | v{m.get(M.POLICY_VERSION, '?')}"
    )


LINE_KEYS = (M.REWARD_MEAN, M.REWARD_STD, M.KL, M.CLIP_FRAC, M.TOKENS_PER_S, M.STALENESS_MEAN)


def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no metrics (is {run_dir} a run folder?)")
    return jsonl.read(path)  # a torn last line (a learner mid-write) is left out
