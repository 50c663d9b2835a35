"""The figures behind three implementation choices, each measured side by side in one run.

    python -m bench.choices          # prints a table, writes bench/results/choices.json

* `crc32c_vs_crc32_speedup`: the time of zlib's CRC-32 (store format 1) / google-crc32c's
  CRC-32C (format 2, `buffer.checksums`) over the same 64 MiB of token ids: why the
  Arrow segments of schema version 2 carry CRC-32C (`buffer/schema.py`).
* `lz4_vs_zstd1_encode_speedup`: the time to encode one Zarr value chunk (65,536 int32
  token ids, `ZarrWriter`'s default) with zstd level 1 / with the store's Blosc LZ4
  (`buffer.zarr_store.CHUNK_CODECS`: byte-shuffled, level 5): why an append, which
  re-encodes each array's tail chunk, uses LZ4 (`buffer/zarr_store.py`). The compressed
  sizes are recorded beside it.
* `adamw_fused_vs_default_speedup`: one AdamW step of torch's default implementation
  (on CPU a loop over the tensors) / the fused kernel (`learner.optim.build_optimizer`) on float32 parameters shaped like
  SmolLM2-135M's decoder layers: why the learner asks for `fused=True`.

Each goal is >= 1: the choice must pay on this machine. Times are medians of `--reps`
rounds, the two arms alternating, since the box is shared.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import zlib
from pathlib import Path

import numpy as np

from bench.figures import figure, write_result

OUT = Path(__file__).resolve().parent / "results" / "choices.json"
VOCAB = 49_152  # SmolLM2's: token ids below 2^16, as in the real buffer


def _median_pair(a, b, reps: int) -> tuple[float, float]:
    """Median wall times of `a()` and `b()`, alternating, after one warm-up each."""
    a(), b()
    ta, tb = [], []
    for _ in range(reps):
        for fn, out in ((a, ta), (b, tb)):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb)


def checksums(reps: int) -> dict:
    import google_crc32c

    data = np.random.default_rng(0).integers(0, VOCAB, 16 << 20, dtype=np.int32)  # 64 MiB
    crc32, crc32c = _median_pair(lambda: zlib.crc32(data), lambda: google_crc32c.value(data), reps)
    return {"bytes": data.nbytes, "crc32_s": crc32, "crc32c_s": crc32c, "ratio": crc32 / crc32c}


def codecs(reps: int) -> dict:
    from numcodecs import Blosc, Zstd

    from grpo_stream.buffer.zarr_store import CHUNK_CODECS

    blosc = CHUNK_CODECS[0]  # zarr's BloscCodec: the same settings through numcodecs
    shuffle = {"noshuffle": Blosc.NOSHUFFLE, "shuffle": Blosc.SHUFFLE,
               "bitshuffle": Blosc.BITSHUFFLE}[blosc.shuffle.value]  # fmt: skip
    lz4 = Blosc(cname=blosc.cname.value, clevel=blosc.clevel, shuffle=shuffle)
    zstd = Zstd(level=1)
    chunk = np.random.default_rng(0).integers(0, VOCAB, 65_536, dtype=np.int32)  # [65536]
    # 50 encodes per round: one takes well under a millisecond
    t_zstd, t_lz4 = _median_pair(lambda: [zstd.encode(chunk) for _ in range(50)],
                                 lambda: [lz4.encode(chunk) for _ in range(50)], reps)  # fmt: skip
    return {"chunk_bytes": chunk.nbytes, "lz4": str(lz4), "zstd": str(zstd),
            "lz4_bytes": len(lz4.encode(chunk)), "zstd_bytes": len(zstd.encode(chunk)),
            "lz4_s_per_50": t_lz4, "zstd_s_per_50": t_zstd, "ratio": t_zstd / t_lz4}  # fmt: skip


def adamw(reps: int, layers: int) -> dict:
    import torch

    hidden, inter = 576, 1536  # SmolLM2-135M's decoder layer: q/k/v/o and the MLP
    shapes = [(hidden, hidden), (192, hidden), (192, hidden), (hidden, hidden),
              (inter, hidden), (inter, hidden), (hidden, inter), (hidden,), (hidden,)]  # fmt: skip
    g = torch.Generator().manual_seed(0)

    def params():
        ps = [torch.randn(s, generator=g).requires_grad_() for _ in range(layers) for s in shapes]
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g)
        return ps

    default = torch.optim.AdamW(params(), lr=1e-5)
    fused = torch.optim.AdamW(params(), lr=1e-5, fused=True)
    n = sum(p.numel() for group in default.param_groups for p in group["params"])
    t_default, t_fused = _median_pair(default.step, fused.step, reps)
    return {"parameters": n, "threads": torch.get_num_threads(), "default_s": t_default,
            "fused_s": t_fused, "ratio": t_default / t_fused}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.choices", description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument(
        "--layers", type=int, default=30, help="decoder layers of parameters (30: 135M's)"
    )
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    crc, codec, opt = checksums(args.reps), codecs(args.reps), adamw(args.reps, args.layers)
    figs = [figure("crc32c_vs_crc32_speedup", crc["ratio"], "x", ">=", 1.0),
            figure("lz4_vs_zstd1_encode_speedup", codec["ratio"], "x", ">=", 1.0),
            figure("adamw_fused_vs_default_speedup", opt["ratio"], "x", ">=", 1.0)]  # fmt: skip
    write_result(args.out, figs, {"reps": args.reps, "checksums": crc, "codecs": codec,
                                  "adamw": opt})  # fmt: skip
    for f in figs:
        print(f"{f['name']:32s} {f['value']:>8} {f['unit']}  {f['op']} {f['goal']}  "
              f"{'ok' if f['ok'] else 'MISSED'}")  # fmt: skip
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
