"""Unit: what the NCCL weight sync no longer wastes, checked without a GPU.

* The learner gathers a full state dict (FSDP: onto rank 0's CPU) only for the disk sync
  and checkpoints; NCCL streams the parameters themselves.
* The weights travel in the servers' dtype: `make_weight_sync` gives `NCCLSync` the wire dtype
  of `server.dtype` (bf16 servers: half the bytes of fp32).
"""

from __future__ import annotations

import pytest
import torch

from grpo_stream.config import load_config
from grpo_stream.sync import make_weight_sync


@pytest.mark.parametrize("transport, gathers", [("disk", True), ("nccl", False), ("none", False)])
def test_only_disk_sync_gathers_a_state_dict(transport: str, gathers: bool, tmp_path) -> None:
    cfg = load_config(None, [f"sync.transport={transport}"])
    assert make_weight_sync(cfg, str(tmp_path)).needs_state_dict is gathers


@pytest.mark.parametrize(
    "server_dtype, wire", [("bfloat16", torch.bfloat16), ("float32", torch.float32), ("auto", None)]
)
def test_nccl_sync_sends_in_the_server_dtype(server_dtype: str, wire, tmp_path) -> None:
    cfg = load_config(None, ["sync.transport=nccl", f'server.dtype="{server_dtype}"'])
    sync = make_weight_sync(cfg, str(tmp_path))  # vLLM and CUDA are touched only on the first push
    assert sync.wire_dtype is wire
    assert sync.urls == ["http://127.0.0.1:8000"]
