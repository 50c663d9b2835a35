"""Benchmark: chunked log-probs from hidden states vs the naive full-logits path.

    python -m bench.logprobs            # from the repository root; writes bench/results/logprobs.json

Workload: one learner micro-batch, forward + backward, SmolLM2's output layer
(V = 49,152, H = 576), B x T = 8 x 256 tokens, float32. The loss is sum(c * logprob)
with a fixed random c, so the backward is the one the GRPO loss would run.

* naive: what a user writes: ``logits = hidden @ W.T``; ``log_softmax(logits.float())``;
  ``gather``. Holds the [B*T, V] logits, their log-softmax and their gradients.
* chunked: ``grpo_stream.algo.token_logprobs_from_hidden`` with `chunk_size` tokens per
  chunk, recomputing each chunk's logits in the backward.

How memory is measured (honestly, per variant, from a clean slate): each variant runs in
a fresh subprocess. On CPU, the child builds its inputs, runs a tiny warm-up (library
and thread-pool start-up), records its resident set size, resets the kernel's peak-RSS
counter (``echo 5 > /proc/self/clear_refs``), runs one forward + backward, and reports
peak RSS (VmHWM) minus the RSS before. PyTorch's CPU allocator does not cache, and
glibc returns large blocks to the kernel on free, so RSS follows live tensors; the
figure includes the gradients of `hidden` and `W` that both variants must produce. On
CUDA it is ``torch.cuda.max_memory_allocated()`` minus the allocation before the step.
peak_memory_ratio = chunked peak / naive peak (goal <= 0.25).

Time is measured in this process: a warm-up of each, then `REPS` rounds with the two
variants alternating order, median wall time of forward + backward per variant;
speed_ratio = naive / chunked (goal >= 1.0). forward_speed_ratio is the same for a
no-grad forward (the learner's proximal and reference passes). All are ratios taken side
by side in one run, since the machines are shared and absolute times drift.

What to expect: with gradients, the chunked path does four [N, H] x [H, V]-sized matmuls
(the forward, its recompute, and the two gradients) where the naive one does three, and
wins back the memory-bound passes over the [N, V] float32 tensors (allocation, page
faults, log_softmax and its backward); on a CPU the two roughly cancel. The no-grad
forward does the same single matmul in both, so there the chunked path should win.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from grpo_stream.algo import token_logprobs_from_hidden

CONFIG = {"B": 8, "T": 256, "H": 576, "V": 49152, "chunk_size": 256, "dtype": "float32"}
REPS = 2
RESULTS = Path(__file__).resolve().parent / "results" / "logprobs.json"


def _inputs(device: str, b: int, t: int, h: int, v: int):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(b, t, h, generator=g).to(device).requires_grad_()  # [B, T, H]
    weight = (0.05 * torch.randn(v, h, generator=g)).to(device).requires_grad_()  # [V, H]
    ids = torch.randint(0, v, (b, t), generator=g).to(device)  # [B, T]
    coef = torch.randn(b, t, generator=g).to(device)  # [B, T]
    return hidden, weight, ids, coef


def _naive(hidden, weight, ids, chunk_size):
    logits = hidden @ weight.t()  # [B, T, V]
    logp = torch.log_softmax(logits.float(), dim=-1)  # [B, T, V]
    return logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)  # [B, T]


def _chunked(hidden, weight, ids, chunk_size):
    return token_logprobs_from_hidden(hidden, weight, ids, chunk_size)[0]  # [B, T]


VARIANTS = {"naive": _naive, "chunked": _chunked}


def _step(fn, hidden, weight, ids, coef, chunk_size) -> torch.Tensor:
    hidden.grad = weight.grad = None
    lp = fn(hidden, weight, ids, chunk_size)  # [B, T]
    (lp * coef).sum().backward()
    return lp.detach()


def _forward_only(fn, hidden, weight, ids, coef, chunk_size) -> torch.Tensor:
    with torch.no_grad():  # the learner's proximal / reference pass
        return fn(hidden, weight, ids, chunk_size)  # [B, T]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _child_peak(variant: str, device: str) -> float:
    """Peak extra bytes of one forward + backward; runs in a fresh process."""
    cfg = CONFIG
    fn = VARIANTS[variant]
    _step(fn, *_inputs(device, 1, 4, cfg["H"], 64), cfg["chunk_size"])  # start-up only
    args = _inputs(device, cfg["B"], cfg["T"], cfg["H"], cfg["V"])
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        _step(fn, *args, cfg["chunk_size"])
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - before)
    before = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    _step(fn, *args, cfg["chunk_size"])
    return float(_rss_kib("VmHWM") - before) * 1024


def _peak_in_subprocess(variant: str, device: str) -> float:
    out = subprocess.run(
        [sys.executable, "-m", "bench.logprobs", "--child", variant, device],
        check=True,
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    return float(out.stdout.strip().splitlines()[-1])


def _time_variants(device: str, step) -> tuple[dict[str, float], float]:
    cfg = CONFIG
    args = _inputs(device, cfg["B"], cfg["T"], cfg["H"], cfg["V"])
    outs = {k: step(fn, *args, cfg["chunk_size"]) for k, fn in VARIANTS.items()}  # warm-up
    max_diff = float((outs["naive"] - outs["chunked"]).abs().max())
    times: dict[str, list[float]] = {k: [] for k in VARIANTS}
    for rep in range(REPS):
        order = list(VARIANTS) if rep % 2 == 0 else list(reversed(VARIANTS))
        for name in order:
            _sync(device)
            start = time.perf_counter()
            step(VARIANTS[name], *args, cfg["chunk_size"])
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}, max_diff


def _machine(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} / torch {torch.__version__}"
    return (
        f"{platform.machine()} {os.cpu_count()} cpus, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}"
    )


def _figure(name, value, op, goal):
    ok = value <= goal if op == "<=" else value >= goal
    return {"name": name, "value": round(value, 4), "unit": "x", "op": op, "goal": goal, "ok": ok}


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    peaks = {k: _peak_in_subprocess(k, device) for k in VARIANTS}
    times, max_diff = _time_variants(device, _step)
    fwd_times, _ = _time_variants(device, _forward_only)
    mem_ratio = peaks["chunked"] / peaks["naive"]
    speed_ratio = times["naive"] / times["chunked"]
    fwd_ratio = fwd_times["naive"] / fwd_times["chunked"]
    print(f"log-probs on {device}: {CONFIG}  (max |diff| {max_diff:.2e})")
    print(f"{'variant':<10}{'peak MiB':>12}{'fwd+bwd s':>12}{'no-grad fwd s':>15}")
    for k in VARIANTS:
        print(f"{k:<10}{peaks[k] / 2**20:>12.1f}{times[k]:>12.3f}{fwd_times[k]:>15.3f}")
    figures = [
        _figure("peak_memory_ratio", mem_ratio, "<=", 0.25),
        _figure("speed_ratio", speed_ratio, ">=", 1.0),
        _figure("forward_speed_ratio", fwd_ratio, ">=", 1.0),
    ]
    for f in figures:
        print(f"{f['name']:<22}{f['value']:>8.3f} (goal {f['op']} {f['goal']}) ok={f['ok']}")
    config = CONFIG | {"device": device, "reps": REPS, "peak_bytes": peaks}
    config |= {"fwd_bwd_seconds": times, "forward_seconds": fwd_times}
    config["max_abs_logprob_diff"] = max_diff
    result = {"figures": figures, "machine": _machine(device), "config": config}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, RESULTS)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        print(_child_peak(sys.argv[2], sys.argv[3]))
    else:
        main()
