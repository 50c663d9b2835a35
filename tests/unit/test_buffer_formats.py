"""Store format versions and the row -> column conversion.

`data/arrow_store_v1` was written by grpo-stream at schema version 1 (CRC-32 column
checksums), from `make_groups` with the arguments in `_V1_GROUPS`: version-2 code must
read it, detect corruption in it, and keep appending to it in its own format.
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from bench.synth import make_group, make_groups
from grpo_stream.buffer import CorruptSegmentError, open_reader, open_writer
from grpo_stream.buffer.arrow_rollup import SEG_META_KEY, VERSION_KEY
from grpo_stream.buffer.arrow_store import ArrowWriter
from grpo_stream.buffer.checksums import column_crc
from grpo_stream.buffer.columns import samples_to_table

V1_STORE = Path(__file__).parent / "data" / "arrow_store_v1"
_V1_GROUPS = {"group_size": 2, "prompt_len": 6, "completion_len": 5}


def _v1_groups() -> list:
    groups = make_groups(3, **_V1_GROUPS)
    row = 0
    for gid, group in enumerate(groups):  # as the writer numbered them
        for s in group:
            s.group_id, s.row_id, s.run_id = gid, row, "test"
            row += 1
    return groups


def _segments(path) -> list[str]:
    return sorted(f for f in os.listdir(path) if f.startswith("seg-"))


def _segment_version(path: str) -> bytes:
    table = pa.ipc.open_file(pa.py_buffer(open(path, "rb").read())).read_all()
    return table.schema.metadata[VERSION_KEY]


@pytest.fixture
def v1_store(tmp_path) -> str:
    path = tmp_path / "buf"
    shutil.copytree(V1_STORE, path)
    return str(path)


def test_version_1_store_still_reads(v1_store):
    r = open_reader(v1_store, on_corrupt="error")
    assert r.meta["schema_version"] == 1
    assert r.read_groups(0, 3) == _v1_groups()
    gids = r.read_table(0, 3, ["group_id"]).column("group_id").to_pylist()
    assert sorted(set(gids)) == [0, 1, 2]
    assert r.corrupt() == []


def test_version_1_corruption_is_still_detected(v1_store):
    seg = os.path.join(v1_store, _segments(v1_store)[0])
    raw = bytearray(open(seg, "rb").read())
    needle = np.asarray(_v1_groups()[1][1].completion_ids[:3], np.int32).tobytes()
    at = raw.find(needle)
    assert at > 0
    raw[at : at + 4] = b"\xde\xad\xbe\xef"
    open(seg, "wb").write(bytes(raw))
    r = open_reader(v1_store)
    assert [g[0].group_id for g in r.read_groups(0, 3)] == [2]
    assert "fails its CRC-32 check" in r.corrupt_reasons()[_segments(v1_store)[0]]
    with pytest.raises(CorruptSegmentError, match="completion_ids"):
        open_reader(v1_store, on_corrupt="error").read_groups(0, 3)


def test_a_writer_extends_a_version_1_store_in_its_format(v1_store):
    w = ArrowWriter(v1_store, fsync=False, rollup_segments=2, rollup_target_groups=16)
    assert w.append_groups([make_group(3, **_V1_GROUPS)]) == (3, 4)
    # the two old segments and the new one were rolled up: all still version 1
    assert json.loads(Path(v1_store, "meta.json").read_text())["schema_version"] == 1
    assert [_segment_version(os.path.join(v1_store, s)) for s in _segments(v1_store)] == [b"1"]
    r = open_reader(v1_store, on_corrupt="error")
    assert r.read_groups(0, 3) == _v1_groups()
    assert r.read_groups(3, 4)[0][0].completion_ids == make_group(3, **_V1_GROUPS)[0].completion_ids


def test_new_stores_checksum_columns_with_crc32c(tmp_path):
    path = str(tmp_path / "buf")
    open_writer(path, backend="arrow", fsync=False).append_groups(make_groups(2))
    seg = os.path.join(path, _segments(path)[0])
    table = pa.ipc.open_file(pa.py_buffer(open(seg, "rb").read())).read_all()
    assert table.schema.metadata[VERSION_KEY] == b"2"
    crcs = json.loads(table.schema.metadata[SEG_META_KEY])["crc"]
    assert crcs["completion_ids"] == column_crc(table.column("completion_ids"), version=2)
    assert crcs["completion_ids"] != column_crc(table.column("completion_ids"), version=1)
    raw = bytearray(open(seg, "rb").read())
    at = raw.find(np.asarray(make_group(1)[2].completion_ids[:3], np.int32).tobytes())
    assert at > 0
    raw[at : at + 4] = b"\x00\x00\x00\x00"
    open(seg, "wb").write(bytes(raw))
    r = open_reader(path)
    assert r.read_groups(0, 2) == []
    assert "fails its CRC-32C check" in r.corrupt_reasons()[_segments(path)[0]]


def _crc32_as_version_1_wrote_it(col: pa.ChunkedArray | pa.Array) -> int:
    """The CRC-32 of grpo-stream's version-1 code: per chunk, relative offsets then values."""
    crc = 0
    for chunk in col.chunks if isinstance(col, pa.ChunkedArray) else [col]:
        n, off, bufs = len(chunk), chunk.offset, chunk.buffers()
        if pa.types.is_large_list(chunk.type) or pa.types.is_string(chunk.type):
            odt = np.int64 if pa.types.is_large_list(chunk.type) else np.int32
            vdt = (
                np.uint8
                if pa.types.is_string(chunk.type)
                else np.dtype(chunk.type.value_type.to_pandas_dtype())
            )
            offs = np.frombuffer(bufs[1], odt, n + 1, off * np.dtype(odt).itemsize)
            crc = zlib.crc32((offs - offs[0]).tobytes(), crc)
            vbuf = bufs[2] if pa.types.is_string(chunk.type) else bufs[3]
            lo, hi = int(offs[0]), int(offs[-1])
            vals = np.frombuffer(vbuf, vdt, hi - lo, lo * np.dtype(vdt).itemsize)
            crc = zlib.crc32(vals.tobytes(), crc)
        else:
            dt = np.dtype(chunk.type.to_pandas_dtype())
            crc = zlib.crc32(np.frombuffer(bufs[1], dt, n, off * dt.itemsize).tobytes(), crc)
    return crc


def test_checksums_cover_logical_bytes_as_version_1_did():
    table = samples_to_table(make_groups(3, group_size=2))
    for name in ("prompt_ids", "behaviour_logprobs", "completion_text", "reward", "row_id"):
        col = table.column(name)
        whole = col.slice(2, 3)
        chunked = pa.chunked_array([col.slice(2, 1), col.slice(3, 2)])
        copy = pa.array(whole.to_pylist(), whole.type)  # fresh buffers, offsets from 0
        for c in (col, whole, chunked):
            assert column_crc(c, version=1) == _crc32_as_version_1_wrote_it(c), name
        for version in (1, 2):  # a slice checksums like a copy of it
            assert column_crc(whole, version) == column_crc(copy, version), name


def test_samples_to_table_takes_lists_arrays_and_shared_prompts():
    lists = make_groups(3, group_size=3)
    arrays = make_groups(3, group_size=3)
    for group in arrays:
        prompt = np.asarray(group[0].prompt_ids, np.int64)  # one object for the group
        for s in group:
            s.prompt_ids = prompt
            s.completion_ids = tuple(s.completion_ids)
            s.behaviour_logprobs = np.asarray(s.behaviour_logprobs, np.float32)
    assert samples_to_table(arrays).equals(samples_to_table(lists))
    want = [s.prompt_ids for g in lists for s in g]
    assert samples_to_table(lists).column("prompt_ids").to_pylist() == want


@pytest.mark.parametrize(
    "value",
    [[[1, 2], [3]], [1.5, 2.0], [2**40], np.ones((2, 2))],
    ids=["nested", "floats", "too-large", "2-D"],
)
def test_samples_to_table_names_a_bad_token_list(value):
    group = make_group(0, group_size=2)
    group[1].completion_ids = value
    with pytest.raises(ValueError, match=r"Sample\.completion_ids: expected a flat list of int32"):
        samples_to_table([group])


def test_zarr_store_with_older_chunk_codecs_keeps_working(tmp_path, monkeypatch):
    from zarr.codecs import ZstdCodec

    from grpo_stream.buffer import zarr_store

    path = str(tmp_path / "buf")
    with monkeypatch.context() as m:  # a store created with the codecs used before
        m.setattr(zarr_store, "CHUNK_CODECS", ZstdCodec(level=1, checksum=True))
        old = open_writer(path, backend="zarr", fsync=False)
        old.append_groups(make_groups(3))
        old.close()
    w = open_writer(path, backend="zarr", fsync=False)
    assert w.append_groups(make_groups(2, start=3)) == (3, 5)
    got = open_reader(path, on_corrupt="error").read_groups(0, 5)
    assert [s.completion_ids for g in got for s in g] == [
        s.completion_ids for g in make_groups(5) for s in g
    ]
