"""The RolloutStore contract, run against both backends, on local disk and memory://."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pytest

from bench.synth import make_group, make_groups
from grpo_stream.buffer import (
    SCHEMA_VERSION,
    GroupCursor,
    SchemaVersionError,
    open_reader,
    open_writer,
)

BACKENDS = ["arrow", "zarr"]


@pytest.fixture(params=["local", "memory"])
def where(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "buf")
    return f"memory://grpo-test-{uuid.uuid4().hex}/buf"


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def _assert_groups_equal(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert len(g) == len(w)
        for a, b in zip(g, w, strict=True):
            assert a == b
            # log-probs are float32 on disk: bitwise equal to the float32 we wrote
            la = np.asarray(a.behaviour_logprobs, np.float32).view(np.uint32)
            lb = np.asarray(b.behaviour_logprobs, np.float32).view(np.uint32)
            np.testing.assert_array_equal(la, lb)


def test_round_trip_exact(where, backend):
    groups = make_groups(5, group_size=3)
    w = open_writer(where, backend=backend, run_id="r")
    assert w.append_groups(groups[:2]) == (0, 2)
    assert w.append_groups(groups[2:]) == (2, 5)
    assert [s.group_id for g in groups for s in g] == [i for i in range(5) for _ in range(3)]
    assert [s.row_id for g in groups for s in g] == list(range(15))
    r = open_reader(where)
    assert r.num_groups() == 5
    _assert_groups_equal(r.read_groups(0, 5), groups)
    _assert_groups_equal(r.read_groups(1, 4), groups[1:4])
    assert r.read_groups(3, 3) == []
    assert r.corrupt() == []


def test_meta_json_records_the_store(where, backend):
    open_writer(where, backend=backend, run_id="run-7").append_groups(make_groups(1))
    r = open_reader(where)
    assert r.meta["backend"] == backend
    assert r.meta["schema_version"] == SCHEMA_VERSION == 2
    assert r.meta["run_id"] == "run-7"
    assert r.meta["created_at"] > 1.6e9


@pytest.mark.parametrize("appends", [1, 4], ids=["one_append", "four_appends"])
def test_read_table_matches_samples(where, backend, appends):
    groups = make_groups(4, group_size=3)
    w = open_writer(where, backend=backend)
    for i in range(appends):  # arrow: one segment per append (no roll-up below 4 of a tier)
        w.append_groups(groups[i * 4 // appends : (i + 1) * 4 // appends])
    w.close()
    r = open_reader(where)
    cols = ["group_id", "row_id", "reward", "prompt_ids", "completion_ids", "behaviour_logprobs"]
    t = r.read_table(1, 3, cols)
    want = [s for g in groups[1:3] for s in g]
    assert t.column_names == cols and t.num_rows == 6
    np.testing.assert_array_equal(t.column("group_id").to_numpy(), [1, 1, 1, 2, 2, 2])
    np.testing.assert_array_equal(t.column("row_id").to_numpy(), [s.row_id for s in want])
    np.testing.assert_array_equal(
        t.column("reward").to_numpy(), np.float32([s.reward for s in want])
    )
    for name in ("prompt_ids", "completion_ids", "behaviour_logprobs"):
        assert t.column(name).to_pylist() == [getattr(s, name) for s in want], name
    assert str(t.schema.field("completion_ids").type.value_type) == "int32"
    assert str(t.schema.field("behaviour_logprobs").type.value_type) == "float"
    _assert_groups_equal(r.read_groups(1, 3), groups[1:3])  # the learner's path, same rows


def test_new_writer_continues_numbering(where, backend):
    w = open_writer(where, backend=backend, run_id="r")
    w.append_groups(make_groups(3))
    w.close()
    w2 = open_writer(where, backend=backend, run_id="r")
    assert w2.num_groups() == 3
    more = make_groups(2, start=3)
    assert w2.append_groups(more) == (3, 5)
    assert more[0][0].row_id == 3 * 4  # 3 groups of 4 samples before it
    r = open_reader(where)
    got = r.read_groups(0, 5)
    assert [g[0].group_id for g in got] == [0, 1, 2, 3, 4]
    assert [s.row_id for g in got for s in g] == list(range(20))


def test_reader_refresh_sees_new_groups(where, backend):
    w = open_writer(where, backend=backend)
    w.append_groups(make_groups(2))
    r = open_reader(where)
    assert r.num_groups() == 2
    w.append_groups(make_groups(3, start=2))
    assert r.num_groups() == 2  # not until refresh
    assert r.refresh() == 5
    assert [g[0].group_id for g in r.read_groups(2, 5)] == [2, 3, 4]


def test_opening_with_the_wrong_backend_is_refused(where, backend):
    open_writer(where, backend=backend).append_groups(make_groups(1))
    other = "zarr" if backend == "arrow" else "arrow"
    with pytest.raises(ValueError, match="meta.json: store backend is"):
        open_writer(where, backend=other)


def test_unknown_schema_version_in_meta_json(where, backend):
    open_writer(where, backend=backend).append_groups(make_groups(1))
    r = open_reader(where)
    fs, root = r.sfs.fs, r.sfs.root
    meta = json.loads(fs.cat_file(f"{root}/meta.json"))
    meta["schema_version"] = 99
    fs.pipe_file(f"{root}/meta.json", json.dumps(meta).encode())
    with pytest.raises(SchemaVersionError, match=r"meta\.json: schema version 99"):
        open_reader(where)


def test_unknown_schema_version_in_the_data(tmp_path, backend):
    path = str(tmp_path / "buf")
    open_writer(path, backend=backend).append_groups(make_groups(1))
    if backend == "zarr":
        import zarr

        zarr.open_group(path, mode="r+").attrs["grpo_stream_schema_version"] = 7
        with pytest.raises(SchemaVersionError, match=r"zarr\.json: schema version 7"):
            open_reader(path)
        return
    import pyarrow as pa

    from grpo_stream.buffer.arrow_rollup import SEG_META_KEY, list_segments

    r = open_reader(path)
    seg = list_segments(r.sfs)[0]
    seg_path = r.sfs.join(seg.name)
    table = pa.ipc.open_file(pa.py_buffer(open(seg_path, "rb").read())).read_all()
    md = dict(table.schema.metadata)
    md[b"grpo_stream_schema_version"] = b"7"
    assert SEG_META_KEY in md
    with pa.OSFile(seg_path, "wb") as f, pa.ipc.new_file(f, table.schema.with_metadata(md)) as w:
        w.write_table(table.replace_schema_metadata(md))
    with pytest.raises(SchemaVersionError, match=f"{seg.name}: schema version 7"):
        open_reader(path).read_groups(0, 1)


def test_cursor_resume_without_loss_or_duplication(where, backend):
    w = open_writer(where, backend=backend)
    w.append_groups(make_groups(10))
    cur = GroupCursor(open_reader(where))
    first, _ = cur.next_groups(4, timeout_s=5)
    state = json.loads(json.dumps(cur.state()))  # survives a JSON checkpoint
    assert state["position"] == 4
    w.append_groups(make_groups(2, start=10))
    cur2 = GroupCursor(open_reader(where))
    cur2.load_state(state)
    rest, _ = cur2.next_groups(8, timeout_s=5)
    ids = [g[0].group_id for g in first + rest]
    assert ids == list(range(12))
    assert cur2.available() == 0


def test_cursor_filters_stale_groups(where, backend):
    groups = [make_group(i, version=i) for i in range(6)]  # versions 0..5
    open_writer(where, backend=backend).append_groups(groups)
    cur = GroupCursor(open_reader(where))
    fresh, stale = cur.next_groups(6, timeout_s=5, max_staleness=2, current_version=5)
    assert [g[0].policy_version for g in fresh] == [3, 4, 5]
    assert stale == 3
    assert cur.state() == {
        "position": 6,
        "skipped_stale": 3,
        "skipped_deleted": 0,
        "skipped_corrupt": 0,
        "skipped_lineage": 0,
        "skipped_ahead": 0,
    }


def test_cursor_times_out_with_a_clear_error(where, backend):
    open_writer(where, backend=backend).append_groups(make_groups(2))
    cur = GroupCursor(open_reader(where), poll_s=0.001)
    with pytest.raises(TimeoutError, match="for 3 groups after group 0; only 2 published"):
        cur.next_groups(3, timeout_s=0.01)
    assert cur.position == 0  # nothing consumed


def test_empty_group_is_refused(where, backend):
    w = open_writer(where, backend=backend)
    with pytest.raises(ValueError, match="group 1 is empty"):
        w.append_groups([make_group(0), []])


def test_second_writer_is_refused_until_the_first_closes(tmp_path, backend):
    import os
    import subprocess
    import sys

    from grpo_stream.buffer import WriterLockedError

    path = str(tmp_path / "buf")
    w = open_writer(path, backend=backend)
    w.append_groups(make_groups(2))
    with pytest.raises(WriterLockedError, match=rf"pid {os.getpid()} on .* holds .*writer.lock"):
        open_writer(path, backend=backend)
    # another process is refused too, and nothing it could have written exists
    code = (
        "import sys; from grpo_stream.buffer import open_writer\n"
        f"try: open_writer({path!r}, backend={backend!r})\n"
        "except RuntimeError as e: print(e); sys.exit(3)"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert other.returncode == 3 and "another writer" in other.stdout, other.stderr
    w.close()
    w2 = open_writer(path, backend=backend)  # the lock went with the first writer
    assert w2.append_groups(make_groups(1, start=2)) == (2, 3)
    w2.close()
    assert open_reader(path).num_groups() == 3


def test_user_fixable_errors_are_user_errors_naming_the_field(tmp_path, backend):
    from grpo_stream.buffer import CorruptSegmentError, GroupsDeletedError, WriterLockedError
    from grpo_stream.core.errors import UserError

    path = str(tmp_path / "buf")
    with pytest.raises(UserError, match=r"no rollout store at .*buf \(missing meta\.json\)"):
        open_reader(path)
    for opts, field in [({"max_groups": 0}, "max_groups"), ({"max_age_s": 0.0}, "max_age_s")]:
        with pytest.raises(UserError, match=rf"buffer\.{field}: must be"):
            open_writer(path, backend=backend, **opts)
    open_writer(path, backend=backend).append_groups(make_groups(1))
    with pytest.raises(UserError, match=r"buffer\.on_corrupt: 'ignore' is not"):
        open_reader(path, on_corrupt="ignore")
    errors = (CorruptSegmentError, GroupsDeletedError, WriterLockedError, SchemaVersionError)
    assert all(issubclass(e, UserError) for e in errors)
