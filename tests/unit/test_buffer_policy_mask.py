"""The optional `policy_mask` column: stores written before it read the same (empty
masks: every token the policy's), and a writer extends them with masked rows.

Arrow: the version-1 store in tests/data (written before the column existed).
Zarr: a store written now, with the column's two arrays removed, is byte for byte the
layout of a store from before (its other arrays did not change).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pytest

from bench.synth import make_groups
from grpo_stream.buffer.store import open_reader, open_writer

V1_STORE = Path(__file__).parent / "data" / "arrow_store_v1"


def _masked_group(gid_hint: int):
    [group] = make_groups(1, group_size=2, prompt_len=6, completion_len=5)
    for s in group:
        s.prompt_id = f"masked{gid_hint}"
    group[0].policy_mask = [1, 1, 0, 0, 1]
    group[0].behaviour_logprobs[2:4] = [0.0, 0.0]
    return group


def _legacy_zarr(tmp_path) -> str:
    path = str(tmp_path / "zbuf")
    w = open_writer(path, "zarr", fsync=False)
    w.append_groups(make_groups(3, group_size=2, prompt_len=6, completion_len=5))
    w.close()
    for name in ("policy_mask_ends", "policy_mask"):
        shutil.rmtree(Path(path) / name)
    return path


def test_an_arrow_segment_without_the_column_reads_empty_masks():
    seg = sorted(V1_STORE.glob("seg-*.arrow"))[0]
    table = pa.ipc.open_file(pa.py_buffer(seg.read_bytes())).read_all()
    assert "policy_mask" not in table.column_names  # the data predates the column
    groups = open_reader(str(V1_STORE), on_corrupt="error").read_groups(0, 3)
    assert [s.policy_mask for g in groups for s in g] == [[]] * 6


@pytest.mark.parametrize("backend", ["arrow", "zarr"])
def test_a_store_from_before_the_column_reads_and_takes_masked_rows(tmp_path, backend):
    if backend == "arrow":
        path = str(tmp_path / "abuf")
        shutil.copytree(V1_STORE, path)
    else:
        path = _legacy_zarr(tmp_path)
    old = open_reader(path, on_corrupt="error").read_groups(0, 3)
    assert [s.policy_mask for g in old for s in g] == [[]] * 6
    w = open_writer(path, backend, fsync=False)
    assert w.append_groups([_masked_group(3)]) == (3, 4)
    w.close()
    r = open_reader(path, on_corrupt="error")
    groups = r.read_groups(0, 4)
    assert [s.policy_mask for g in groups[:3] for s in g] == [[]] * 6
    assert [s.policy_mask for s in groups[3]] == [[1, 1, 0, 0, 1], []]
    assert groups[3][0].behaviour_logprobs[2:4] == [0.0, 0.0]
    assert [s.completion_ids for g in groups[:3] for s in g] == [
        s.completion_ids for g in old for s in g
    ]
    assert r.corrupt() == []
