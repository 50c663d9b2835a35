"""`learner.malloc_mmap_threshold_kib`: with it set, freed activation-sized blocks leave
the process's resident memory; with glibc's adaptive threshold they stay in the heap.

Each case runs in a fresh Python (the threshold is process-wide): it frees one 8 MiB
tensor (glibc's adaptive threshold rises to 8 MiB, as after a learner's first step),
allocates 64 touched 2 MiB tensors, frees every other one, and reports how far its RSS
fell. Holes between live blocks in the heap stay resident; unmapped blocks do not.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from grpo_stream.config import Config, ConfigError, LearnerConfig
from grpo_stream.learner.heap import set_mmap_threshold

SCRIPT = """
import json, sys, torch
from grpo_stream.config import Config
from grpo_stream.learner.distributed import DistInfo
from grpo_stream.learner.setup import set_threads
cfg = Config()
cfg.learner.malloc_mmap_threshold_kib = json.loads(sys.argv[1])
set_threads(cfg, DistInfo(0, 1, 0, torch.device("cpu")))  # what the learner calls
def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
big = torch.ones(2**21)  # 8 MiB, mapped; freed, glibc raises its threshold past 2 MiB
del big
blocks = [torch.ones(2**19) for _ in range(64)]  # 64 x 2 MiB, every page touched
full = rss_mib()
del blocks[::2]  # 32 holes between live blocks
print(json.dumps(full - rss_mib()))
"""


def _rss_drop_mib(kib: int | None) -> float:
    done = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(kib)], capture_output=True,
                          text=True, check=True, timeout=120)  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_fixed_threshold_returns_freed_blocks_the_adaptive_one_keeps_them():
    kept = _rss_drop_mib(None)
    returned = _rss_drop_mib(64)
    assert kept < 8  # 64 MiB freed, still resident: holes in the heap
    assert returned > 56  # the 32 freed 2 MiB blocks were unmapped


def test_the_threshold_is_bounded_by_what_glibc_takes():
    assert LearnerConfig(malloc_mmap_threshold_kib=32768).malloc_mmap_threshold_kib == 32768
    for bad in (0, 32769):
        with pytest.raises(ValueError, match="malloc_mmap_threshold_kib"):
            Config.model_validate({"learner": {"malloc_mmap_threshold_kib": bad}})


def test_unset_changes_nothing_and_a_refusal_names_the_field(monkeypatch):
    set_mmap_threshold(None)
    import ctypes

    class NoMallopt:
        def __init__(self, *_):
            pass

    monkeypatch.setattr(ctypes, "CDLL", NoMallopt)  # a C library without mallopt
    with pytest.raises(ConfigError, match="learner.malloc_mmap_threshold_kib = 64"):
        set_mmap_threshold(64)
