"""`grpo-stream buffer stats|show|export|convert|compact|ledger PATH`: inspect and maintain a store.

PATH is a store root, or a run dir whose store is PATH/buffer. Every command reads
through the normal reader (corrupt segments are skipped and listed, never read as data).

    grpo-stream buffer stats runs/r1                 # counts, reward/length per version
    grpo-stream buffer show runs/r1 -n 3 --tokenizer models/smol
    grpo-stream buffer export runs/r1 --format parquet --out r1.parquet
    grpo-stream buffer convert runs/r1/buffer --to zarr --out /tmp/r1.zarr
    grpo-stream buffer compact runs/r1 --keep-groups 10000 --max-age-s 86400
    grpo-stream buffer ledger runs/r1                # every prompt's one state (RUN dir)

`run_cli(argv)` takes the arguments after `buffer` and returns the exit code.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator

import numpy as np
import pyarrow as pa

from grpo_stream.buffer.fsutil import resolve_store_path
from grpo_stream.buffer.store import detect_backend, open_reader, open_writer
from grpo_stream.config import load_run_config
from grpo_stream.core.errors import UserError

BLOCK = 1024  # groups per read while scanning a whole store


def _blocks(reader, columns=None) -> Iterator[pa.Table]:
    start, end = reader.first_group(), reader.num_groups()
    for a in range(start, end, BLOCK):
        yield reader.read_table(a, min(a + BLOCK, end), columns)


def store_stats(path: str) -> dict:
    """Counts, reward and completion-length statistics per policy version, corrupt parts."""
    reader = open_reader(path)
    cols = ["group_id", "policy_version", "reward", "completion_ids"]
    vers, rewards, lens, gids = [], [], [], []
    for t in _blocks(reader, cols):
        vers.append(t.column("policy_version").to_numpy())
        rewards.append(t.column("reward").to_numpy())
        lens.append(pa.compute.list_value_length(t.column("completion_ids")).to_numpy())
        gids.append(t.column("group_id").to_numpy())
    cat = lambda xs, dt: np.concatenate(xs) if xs else np.zeros(0, dt)  # noqa: E731
    ver, rew = cat(vers, np.int64), cat(rewards, np.float32).astype(np.float64)
    ln, gid = cat(lens, np.int64), cat(gids, np.int64)
    per_version = {}
    for v in np.unique(ver):
        m = ver == v
        per_version[str(int(v))] = {
            "groups": int(len(np.unique(gid[m]))),
            "rows": int(m.sum()),
            "reward": _summary(rew[m]),
            "completion_len": {**_summary(ln[m]), "p50": float(np.percentile(ln[m], 50))}
            | {"p90": float(np.percentile(ln[m], 90))},
        }
    return {
        "path": path,
        "backend": detect_backend(path),
        "groups_published": reader.num_groups(),
        "first_group": reader.first_group(),
        "groups_readable": int(len(np.unique(gid))),
        "rows_readable": int(len(gid)),
        "reward": _summary(rew),
        "per_version": per_version,
        "corrupt": reader.corrupt(),
    }


def _summary(x: np.ndarray) -> dict:
    if not len(x):
        return {"mean": None, "std": None, "min": None, "max": None}
    return {
        "mean": float(x.mean()),
        "std": float(x.std()),
        "min": float(x.min()),
        "max": float(x.max()),
    }


def _print_stats(st: dict) -> None:
    print(f"store {st['path']} ({st['backend']})")
    print(
        f"groups: {st['groups_published']} published, {st['groups_readable']} readable "
        f"(first on disk: {st['first_group']}); rows: {st['rows_readable']}"
    )
    print(
        f"{'version':>8} {'groups':>7} {'rows':>7} {'reward mean':>11} {'std':>7} "
        f"{'min':>7} {'max':>7} {'len mean':>8} {'p50':>6} {'p90':>6} {'max':>6}"
    )
    for v, s in st["per_version"].items():
        r, c = s["reward"], s["completion_len"]
        print(
            f"{v:>8} {s['groups']:>7} {s['rows']:>7} {r['mean']:>11.4f} {r['std']:>7.4f} "
            f"{r['min']:>7.3f} {r['max']:>7.3f} {c['mean']:>8.1f} {c['p50']:>6.0f} "
            f"{c['p90']:>6.0f} {c['max']:>6.0f}"
        )
    print("corrupt: " + (", ".join(st["corrupt"]) or "none"))


def _cmd_stats(args) -> int:
    st = store_stats(args.path)
    print(json.dumps(st, indent=1)) if args.json else _print_stats(st)
    return 0


def _cmd_show(args) -> int:
    reader = open_reader(args.path)
    start = reader.first_group() if args.start is None else args.start
    tok = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.tokenizer)
    shown = 0
    for g in reader.read_groups(start, min(start + args.n, reader.num_groups())):
        for s in g:
            if shown >= args.n:
                break
            ptxt = s.prompt_text or (
                tok.decode(s.prompt_ids) if tok else f"<{len(s.prompt_ids)} ids>"
            )
            ctxt = s.completion_text or (
                tok.decode(s.completion_ids) if tok else f"<{len(s.completion_ids)} ids>"
            )
            print(
                f"--- group {s.group_id} sample {s.sample_index} version {s.policy_version} "
                f"reward {s.reward:.4f} {s.reward_components} {s.finish_reason}"
            )
            print(f"prompt: {ptxt}\ncompletion: {ctxt}")
            shown += 1
    return 0


def _cmd_export(args) -> int:
    reader = open_reader(args.path)
    n = 0
    if args.format == "parquet":
        import pyarrow.parquet as pq

        writer = None
        for t in _blocks(reader):
            writer = writer or pq.ParquetWriter(args.out, t.schema)
            writer.write_table(t)
            n += t.num_rows
        if writer is None:
            pq.write_table(pa.table({}), args.out)
        else:
            writer.close()
    else:
        with open(args.out, "w") as f:
            for t in _blocks(reader):
                for row in t.to_pylist():
                    row["reward_components"] = json.loads(row["reward_components"] or "{}")
                    f.write(json.dumps(row) + "\n")
                n += t.num_rows
    print(f"exported {n} rows to {args.out} ({args.format})")
    return 0


def _cmd_convert(args) -> int:
    reader = open_reader(args.path)
    writer = open_writer(args.out, backend=args.to, run_id=reader.meta.get("run_id", ""))
    if writer.num_groups():
        print(f"error: {args.out} already holds {writer.num_groups()} groups", file=sys.stderr)
        return 2
    total = 0
    for a in range(reader.first_group(), reader.num_groups(), args.groups_per_write):
        groups = reader.read_groups(a, min(a + args.groups_per_write, reader.num_groups()))
        if groups:
            writer.append_groups(groups)  # note: group ids are renumbered from 0
            total += len(groups)
    writer.close()
    print(f"converted {total} groups to {args.to} store {args.out}")
    return 0


def _cmd_compact(args) -> int:
    if args.keep_groups is None and args.max_age_s is None:
        print("error: give --keep-groups and/or --max-age-s", file=sys.stderr)
        return 2
    if detect_backend(args.path) == "zarr":  # as the store's writer: refused while one runs
        from grpo_stream.buffer.zarr_store import ZarrWriter

        w = ZarrWriter(args.path, max_groups=args.keep_groups, max_age_s=args.max_age_s)
        try:
            deleted = w.retain()
        finally:
            w.close()
        print(f"deleted {len(deleted)} chunk(s); oldest group kept {w.commit['first_group']}")
        return 0
    from grpo_stream.buffer.arrow_store import compact

    deleted = compact(args.path, keep_groups=args.keep_groups, max_age_s=args.max_age_s)
    print(f"deleted {len(deleted)} segment(s)" + "".join(f"\n  {d}" for d in deleted))
    return 0


def _cmd_ledger(args) -> int:
    """Counts per state; prompts in two states or none (exit 1 if any)."""
    from grpo_stream.run.ledger import format_ledger, run_ledger

    led = run_ledger(args.path)
    print(format_ledger(led, limit=args.limit))
    return 0 if led.ok else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="grpo-stream buffer", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("stats", help="row/group counts, reward and length per version")
    s.add_argument("--json", action="store_true")
    s = sub.add_parser("show", help="print N decoded samples")
    s.add_argument("-n", type=int, default=4)
    s.add_argument("--start", type=int, default=None, help="first group id (default: oldest)")
    s.add_argument("--tokenizer", default=None, help="HF tokenizer dir to decode ids")
    s = sub.add_parser("export", help="write all rows to Parquet or JSONL")
    s.add_argument("--format", choices=["parquet", "jsonl"], default="parquet")
    s.add_argument("--out", required=True)
    s = sub.add_parser("convert", help="copy into a new store of the other backend")
    s.add_argument("--to", choices=["arrow", "zarr"], required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--groups-per-write", type=int, default=256)
    s = sub.add_parser("compact", help="delete old groups (arrow: segments, zarr: chunks)")
    s.add_argument("--keep-groups", type=int, default=None)
    s.add_argument("--max-age-s", type=float, default=None)
    s = sub.add_parser("ledger", help="where every started prompt ended (a run folder)")
    s.add_argument("--limit", type=int, default=20, help="problem prompts listed")
    for sp in sub.choices.values():
        sp.add_argument("path", help="store root, or a run dir holding buffer/")
    return p


COMMANDS = {
    "stats": _cmd_stats,
    "show": _cmd_show,
    "export": _cmd_export,
    "convert": _cmd_convert,
    "compact": _cmd_compact,
    "ledger": _cmd_ledger,
}


def store_path(path: str) -> str:
    """PATH is a store root; or a run folder: with a config.toml, the store its generator
    wrote (`buffer.path`, else RUN/buffer, read with `config.load_run_config`); without
    one, PATH/buffer where that is a store."""
    if os.path.isfile(os.path.join(path, "config.toml")):
        return load_run_config(path, role="generate").buffer_path(path)
    return resolve_store_path(path)


def run_cli(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.cmd != "ledger":  # the ledger reads the run folder, not only its store
            args.path = store_path(args.path)
        return COMMANDS[args.cmd](args)
    except (UserError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(run_cli(sys.argv[1:]))
