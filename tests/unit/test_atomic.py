"""The one atomic-publication helper (grpo_stream.core.atomic): folders and files."""

from __future__ import annotations

import os

import pytest

from grpo_stream.core.atomic import fresh_dir, fsync_tree, publish_dir, write_file_atomic


def test_publish_dir_replaces_an_old_folder_whole(tmp_path):
    final = tmp_path / "v3"
    final.mkdir()
    (final / "old.bin").write_bytes(b"old")
    tmp = fresh_dir(tmp_path / "v3.tmp")
    (tmp / "sub").mkdir()
    (tmp / "sub" / "w.bin").write_bytes(b"\x01\x02\x03")
    (tmp / "config.json").write_text("{}")
    assert publish_dir(tmp, final) == final
    assert sorted(p.relative_to(final).as_posix() for p in final.rglob("*")) == [
        "config.json",
        "sub",
        "sub/w.bin",
    ]
    assert (final / "sub" / "w.bin").read_bytes() == b"\x01\x02\x03"
    assert sorted(os.listdir(tmp_path)) == ["v3"]  # no tmp, no set-aside old folder


def test_fresh_dir_empties_a_leftover(tmp_path):
    left = tmp_path / "step-4.tmp"
    left.mkdir()
    (left / "half.pt").write_bytes(b"x" * 10)
    assert list(fresh_dir(left).iterdir()) == []
    fsync_tree(left)  # an empty folder is fine too


def test_write_file_atomic_leaves_the_old_file_on_failure(tmp_path):
    final, tmp = tmp_path / "meta.json", tmp_path / ".meta.json.tmp"
    write_file_atomic(tmp, final, b'{"a": 1}')
    assert final.read_bytes() == b'{"a": 1}' and not tmp.exists()
    with pytest.raises(TypeError):
        write_file_atomic(tmp, final, "not bytes")  # type: ignore[arg-type]
    assert final.read_bytes() == b'{"a": 1}'
    assert sorted(os.listdir(tmp_path)) == ["meta.json"]  # the tmp file was removed
