"""Replay-buffer throughput: Arrow and Zarr backends vs a JSONL baseline and raw Arrow IPC.

Writes and reads ~1M generated tokens in realistic groups (G=8, prompt ~64 tokens,
completion ~200 tokens, float32 log-probs, short texts) through each format, side by
side in one run, best of `--repeats`:

- write: Sample groups -> storage, appended `--per-append` groups at a time (JSONL: one
  JSON object per sample with lists, as PipelineRL does; raw IPC: one table, one file).
  The Arrow writer uses its default settings, segment roll-up included, as a generator.
- read: storage -> what the learner collates: groups of `Sample`s with per-sample
  token id / log-prob lists, rewards and versions. The backends use `read_groups`, the
  learner's own path (via the cursor); raw IPC memory-maps the one file and goes
  through the same table -> groups conversion; JSONL parses each line into a Sample.

    python -m bench.buffer            # prints a table, writes bench/results/buffer.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import zarr

from bench.synth import make_group
from grpo_stream.buffer.columns import samples_to_table, table_to_groups
from grpo_stream.buffer.schema import SCHEMA_VERSION, Sample
from grpo_stream.buffer.store import open_reader, open_writer

RESULTS = Path(__file__).parent / "results" / "buffer.json"


def make_workload(tokens: int, group_size: int, prompt_len: int, completion_len: int):
    groups, total, gid = [], 0, 0
    while total < tokens:
        g = make_group(gid, group_size, prompt_len, completion_len, version=gid // 64)
        total += sum(len(s.prompt_ids) + len(s.completion_ids) for s in g)
        groups.append(g)
        gid += 1
    return groups, total


def _batches(groups, k):
    return [groups[i : i + k] for i in range(0, len(groups), k)]


def write_jsonl(path: str, groups, k: int) -> None:
    for batch in _batches(groups, k):
        with open(path, "a") as f:
            f.write("".join(json.dumps(s.__dict__) + "\n" for g in batch for s in g))


def read_jsonl(path: str) -> int:
    with open(path) as f:
        samples = [Sample(**json.loads(line)) for line in f]
    return _usable([samples])


def write_store(path: str, backend: str, groups, k: int) -> None:
    w = open_writer(path, backend=backend, run_id="bench", fsync=False)
    for batch in _batches(groups, k):
        w.append_groups(batch)
    w.close()


def _usable(groups) -> int:
    """Completion tokens of every sample read (checks the log-probs came with them)."""
    n = 0
    for g in groups:
        for s in g:
            assert len(s.completion_ids) == len(s.behaviour_logprobs)
            n += len(s.completion_ids)
    return n


def read_store(path: str) -> int:
    r = open_reader(path)
    return _usable(r.read_groups(0, r.num_groups()))


def write_raw(path: str, groups, k: int) -> None:
    table = samples_to_table(groups)
    with pa.OSFile(path, "wb") as f, pa.ipc.new_file(f, table.schema) as w:
        w.write_table(table)


def read_raw(path: str) -> int:
    table = pa.ipc.open_file(pa.memory_map(path, "r")).read_all()
    return _usable(table_to_groups(table))


FORMATS = {
    "jsonl": (write_jsonl, read_jsonl, "file"),
    "arrow": (lambda p, g, k: write_store(p, "arrow", g, k), read_store, "dir"),
    "zarr": (lambda p, g, k: write_store(p, "zarr", g, k), read_store, "dir"),
    "raw_ipc": (write_raw, read_raw, "file"),
}


def measure(groups, k: int, repeats: int, tmp: str) -> dict[str, dict[str, float]]:
    best = {f: {"write": float("inf"), "read": float("inf")} for f in FORMATS}
    for rep in range(repeats):
        for fmt, (write, read, _kind) in FORMATS.items():  # interleaved: same noise for all
            path = os.path.join(tmp, f"{fmt}-{rep}")
            t0 = time.perf_counter()
            write(path, groups, k)
            t1 = time.perf_counter()
            n = read(path)
            t2 = time.perf_counter()
            assert n == sum(len(s.completion_ids) for g in groups for s in g), fmt
            best[fmt]["write"] = min(best[fmt]["write"], t1 - t0)
            best[fmt]["read"] = min(best[fmt]["read"], t2 - t1)
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
    return best


def figures(best: dict) -> list[dict]:
    def fig(name, value, op, goal, unit="x"):
        ok = value >= goal if op == ">=" else value <= goal
        return {
            "name": name,
            "value": round(value, 3),
            "unit": unit,
            "op": op,
            "goal": goal,
            "ok": bool(ok),
        }

    j = best["jsonl"]
    out = []
    for b in ("arrow", "zarr"):
        out.append(fig(f"{b}_vs_jsonl_write", j["write"] / best[b]["write"], ">=", 10))
        out.append(fig(f"{b}_vs_jsonl_read", j["read"] / best[b]["read"], ">=", 10))
    out.append(
        fig(
            "arrow_vs_raw_ipc_read",
            best["arrow"]["read"] / best["raw_ipc"]["read"],
            "<=",
            2,
            unit="ratio",
        )
    )
    return out


def _arrow_defaults() -> dict:
    """The roll-up settings the arrow writer ran with (its defaults, as a generator's)."""
    import inspect

    from grpo_stream.buffer.arrow_store import ArrowWriter

    params = inspect.signature(ArrowWriter).parameters
    return {k: params[k].default for k in ("rollup_segments", "rollup_target_groups")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--completion-len", type=int, default=200)
    ap.add_argument("--per-append", type=int, default=16, help="groups per append (a batch)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    groups, total = make_workload(
        args.tokens, args.group_size, args.prompt_len, args.completion_len
    )
    with tempfile.TemporaryDirectory(prefix="bench-buffer-") as tmp:
        best = measure(groups, args.per_append, args.repeats, tmp)
    figs = figures(best)
    print(
        f"{total} tokens in {len(groups)} groups of {args.group_size}, "
        f"{args.per_append} groups per append, best of {args.repeats}"
    )
    print(f"{'format':>8} {'write s':>9} {'read s':>9} {'write x':>9} {'read x':>9}")
    for fmt, t in best.items():
        print(
            f"{fmt:>8} {t['write']:>9.4f} {t['read']:>9.4f} "
            f"{best['jsonl']['write'] / t['write']:>9.1f} {best['jsonl']['read'] / t['read']:>9.1f}"
        )
    for f in figs:
        print(
            f"{f['name']:>24} {f['value']:>8.2f} {f['op']} {f['goal']}  {'ok' if f['ok'] else 'MISS'}"
        )
    result = {
        "figures": figs,
        "machine": {
            "node": platform.node(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "pyarrow": pa.__version__,
            "zarr": zarr.__version__,
        },
        "config": {
            **vars(args),
            "tokens_actual": total,
            "groups": len(groups),
            "fsync": False,
            "seconds": best,
            "arrow_writer": _arrow_defaults(),
            "schema_version": SCHEMA_VERSION,  # 2: CRC-32C column checksums (1: CRC-32)
            "note": "fsync off for all formats (JSONL baseline does not fsync either); "
            "the arrow writer runs with its default segment roll-up",
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
