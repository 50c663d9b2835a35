"""The one JSONL module (grpo_stream.core.jsonl): torn last lines, bad middle lines, an
append after a torn line, truncate; and the one atomic helper's file forms."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from grpo_stream.core import jsonl
from grpo_stream.core.atomic import atomic_target, atomic_write


def test_a_torn_last_line_is_skipped(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "rew')  # no newline: mid-write
    assert jsonl.read(path) == [{"step": 1}, {"step": 2}]
    # a kill right before the newline: whole JSON, still not a finished line
    path.write_text('{"step": 1}\n{"step": 2}')
    assert jsonl.read(path) == [{"step": 1}]
    # a newline-terminated last line that does not parse (a torn multi-byte write)
    path.write_text('{"step": 1}\n{"st\n')
    assert jsonl.read(path) == [{"step": 1}]
    assert jsonl.read(tmp_path / "missing.jsonl") == []


def test_a_bad_middle_line_names_the_file_and_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n\n{"st\n{"step": 3}\n')
    with pytest.raises(jsonl.JSONLError, match=rf"{path}:3: not valid JSON"):
        jsonl.read(path)
    # a bad line followed only by a torn tail is in the middle too
    path.write_text('{"step": 1}\noops\n{"step": 3')
    with pytest.raises(jsonl.JSONLError, match=rf"{path}:2: not valid JSON"):
        jsonl.read(path)
    path.write_text('{"step": 1}\n[1, 2]\n{"step": 3}\n')
    with pytest.raises(jsonl.JSONLError, match=rf"{path}:2: not a JSON object"):
        jsonl.read(path)


def test_complete_files_keep_a_last_line_without_newline_and_refuse_a_bad_one(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"q": "a"}\n{"q": "b"}')
    assert jsonl.read(path, complete=True) == [{"q": "a"}, {"q": "b"}]
    path.write_text('{"q": "a"}\n{"q": ')
    with pytest.raises(jsonl.JSONLError, match=rf"{path}:2: not valid JSON"):
        jsonl.read(path, complete=True)


def test_append_after_a_torn_line_cuts_the_fragment(tmp_path, capfd):
    path = tmp_path / "trained_batches.jsonl"
    jsonl.append(path, {"step": 1, "group_ids": [0, 1]})
    with open(path, "a") as f:
        f.write('{"step": 2, "group_')  # the learner was killed mid-write
    jsonl.append(path, [{"step": 2, "group_ids": [2, 3]}, {"step": 3, "group_ids": [4]}])
    assert path.read_text() == (
        '{"step": 1, "group_ids": [0, 1]}\n'
        '{"step": 2, "group_ids": [2, 3]}\n'
        '{"step": 3, "group_ids": [4]}\n'
    )
    assert jsonl.read(path)[1] == {"step": 2, "group_ids": [2, 3]}
    assert f"{path}: cut a torn last line (19 bytes)" in capfd.readouterr().err
    # a file that is nothing but a fragment is cut to empty first
    frag = tmp_path / "f.jsonl"
    frag.write_text('{"a"')
    jsonl.append(frag, {"a": 1})
    assert frag.read_text() == '{"a": 1}\n'
    jsonl.append(frag, [])  # nothing to write: nothing changes
    assert frag.read_text() == '{"a": 1}\n'


def test_a_fragment_longer_than_a_read_chunk_is_cut_whole(tmp_path):
    path = tmp_path / "big.jsonl"
    jsonl.append(path, {"a": 1})
    with open(path, "a") as f:
        f.write('{"x": "' + "y" * (3 * jsonl._CHUNK))  # spans several backward reads
    jsonl.append(path, {"a": 2})
    assert path.read_text() == '{"a": 1}\n{"a": 2}\n'


def test_appends_from_two_processes_never_interleave(tmp_path):
    path = tmp_path / "shared.jsonl"
    code = (
        "import sys; from grpo_stream.core import jsonl\n"
        "for i in range(200):\n"
        "    jsonl.append(sys.argv[1], {'w': sys.argv[2], 'i': i, 'pad': 'x' * 5000},"
        " fsync=False)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(path), w], env=env)
             for w in "ab"]  # fmt: skip
    assert [p.wait(120) for p in procs] == [0, 0]
    rows = jsonl.read(path)
    assert len(rows) == 400
    for w in "ab":
        assert [r["i"] for r in rows if r["w"] == w] == list(range(200))


def test_truncate_keeps_matching_rows_and_drops_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 6)) + '{"ste')
    assert jsonl.truncate(path, lambda r: r["step"] <= 3) == 3
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n{"step": 3}\n'
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl"]  # no temporary file left
    assert jsonl.truncate(tmp_path / "missing.jsonl", lambda r: True) == 0
    assert not (tmp_path / "missing.jsonl").exists()


def test_atomic_write_and_target_publish_whole_files_or_nothing(tmp_path):
    final = tmp_path / "sync_failure.json"
    atomic_write(final, '{"step": 3}')
    atomic_write(final, b'{"step": 4}')
    assert final.read_text() == '{"step": 4}'
    out = tmp_path / "plots.png"
    with atomic_target(out, ".png") as tmp:
        assert tmp.name.endswith(".png") and tmp.parent == tmp_path
        tmp.write_bytes(b"PNG")
    assert out.read_bytes() == b"PNG"
    with pytest.raises(RuntimeError), atomic_target(out, ".png") as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("savefig failed")
    assert out.read_bytes() == b"PNG"  # the old file stands, the half one is gone
    assert sorted(os.listdir(tmp_path)) == ["plots.png", "sync_failure.json"]
