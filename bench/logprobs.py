"""Benchmark: the learner's chunked log-prob + loss path vs the naive full-logits path.

    python -m bench.logprobs            # from the repository root; writes bench/results/logprobs.json

Workload: one learner micro-batch, forward + backward, SmolLM2's output layer
(V = 49,152, H = 576), B x T = 8 x 256 tokens, float32. The loss is sum(c * logprob)
with a fixed random c, so the backward is the one the GRPO loss would run.

* naive: what a user writes: ``logits = hidden @ W.T``; ``log_softmax(logits.float())``;
  ``gather``; loss; backward. Holds the [B*T, V] logits, their log-softmax and their
  gradients.
* fused (what the learner trains with): ``grpo_stream.algo.fused_loss_from_hidden``,
  `chunk_size` tokens per chunk; each chunk's softmax is turned into the hidden and
  weight gradients while it is in hand, so no [B*T, V] tensor and no recompute.
* recompute: ``token_logprobs_from_hidden`` (log-probs first, loss after): its backward
  recomputes each chunk's logits, a fourth vocab-sized matmul. Reported for reference;
  it is what the learner's no-grad proximal/reference passes use.

How memory is measured (honestly, per variant, from a clean slate): each variant runs in
a fresh subprocess. On CPU, the child builds its inputs, runs a tiny warm-up (library
and thread-pool start-up), records its resident set size, resets the kernel's peak-RSS
counter (``echo 5 > /proc/self/clear_refs``), runs one forward + backward, and reports
peak RSS (VmHWM) minus the RSS before. PyTorch's CPU allocator does not cache, and
glibc returns large blocks to the kernel on free, so RSS follows live tensors; the
figure includes the gradients of `hidden` and `W` that every variant must produce. On
CUDA it is ``torch.cuda.max_memory_allocated()`` minus the allocation before the step.
peak_memory_ratio = fused peak / naive peak (goal <= 0.25).

Time is measured in this process: a warm-up of each, then `REPS` rounds with the
variants in rotating order, median wall time of forward + backward per variant;
speed_ratio = naive / fused (goal >= 1.0). forward_speed_ratio is naive / recompute for a
no-grad forward (the learner's proximal and reference passes). All are ratios taken
side by side in one run, since the machines are shared and absolute times drift.
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

from grpo_stream.algo import fused_loss_from_hidden, token_logprobs_from_hidden

CONFIG = {"B": 8, "T": 256, "H": 576, "V": 49152, "chunk_size": 256, "dtype": "float32"}
REPS = 3
RESULTS = Path(__file__).resolve().parent / "results" / "logprobs.json"


def _inputs(device: str, b: int, t: int, h: int, v: int):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(b, t, h, generator=g).to(device).requires_grad_()  # [B, T, H]
    weight = (0.05 * torch.randn(v, h, generator=g)).to(device).requires_grad_()  # [V, H]
    ids = torch.randint(0, v, (b, t), generator=g).to(device)  # [B, T]
    coef = torch.randn(b, t, generator=g).to(device)  # [B, T]
    return hidden, weight, ids, coef


def _naive_lp(hidden, weight, ids, chunk_size):
    logits = hidden @ weight.t()  # [B, T, V]
    logp = torch.log_softmax(logits.float(), dim=-1)  # [B, T, V]
    return logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)  # [B, T]


def _recompute_lp(hidden, weight, ids, chunk_size):
    return token_logprobs_from_hidden(hidden, weight, ids, chunk_size)[0]  # [B, T]


def _naive(hidden, weight, ids, coef, chunk_size):
    lp = _naive_lp(hidden, weight, ids, chunk_size)  # [B, T]
    return (lp * coef).sum(), lp


def _fused(hidden, weight, ids, coef, chunk_size):
    loss, lp, _ = fused_loss_from_hidden(
        hidden, weight, ids, lambda rows, lp, ent: (lp * coef[rows]).sum(), chunk_size
    )
    return loss, lp


def _recompute(hidden, weight, ids, coef, chunk_size):
    lp = _recompute_lp(hidden, weight, ids, chunk_size)  # [B, T]
    return (lp * coef).sum(), lp


VARIANTS = {"naive": _naive, "fused": _fused, "recompute": _recompute}
FORWARD = {"naive": _naive_lp, "recompute": _recompute_lp}  # no-grad log-probs only


def _step(fn, hidden, weight, ids, coef, chunk_size) -> torch.Tensor:
    hidden.grad = weight.grad = None
    loss, lp = fn(hidden, weight, ids, coef, chunk_size)
    loss.backward()
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


def _time_variants(device: str, step, variants) -> tuple[dict[str, float], float]:
    cfg = CONFIG
    args = _inputs(device, cfg["B"], cfg["T"], cfg["H"], cfg["V"])
    outs = {k: step(fn, *args, cfg["chunk_size"]) for k, fn in variants.items()}  # warm-up
    max_diff = max(float((outs["naive"] - o).abs().max()) for o in outs.values())
    names = list(variants)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for rep in range(REPS):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:  # rotate
            _sync(device)
            start = time.perf_counter()
            step(variants[name], *args, cfg["chunk_size"])
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
    times, max_diff = _time_variants(device, _step, VARIANTS)
    fwd_times, _ = _time_variants(device, _forward_only, FORWARD)
    mem_ratio = peaks["fused"] / peaks["naive"]
    speed_ratio = times["naive"] / times["fused"]
    fwd_ratio = fwd_times["naive"] / fwd_times["recompute"]
    print(f"log-probs on {device}: {CONFIG}  (max |diff| {max_diff:.2e})")
    print(f"{'variant':<11}{'peak MiB':>10}{'fwd+bwd s':>11}{'vs naive':>10}{'no-grad fwd s':>15}")
    for k in VARIANTS:
        fwd = f"{fwd_times[k]:>15.3f}" if k in fwd_times else f"{'-':>15}"
        ratio = times["naive"] / times[k]
        print(f"{k:<11}{peaks[k] / 2**20:>10.1f}{times[k]:>11.3f}{ratio:>10.2f}{fwd}")
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
    config["recompute_speed_ratio"] = round(times["naive"] / times["recompute"], 4)
    config["recompute_peak_memory_ratio"] = round(peaks["recompute"] / peaks["naive"], 4)
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
