"""bench/RESULTS.md indexes every figure the benchmarks write: each figure of each
bench/results/*.json has a row naming its bench and that file, each row's figure is in
the file it names, and each bench named exists."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ROW = re.compile(r"^\| `(\w+)` \| `bench/(\w+)\.py` \| ([^|]+) \|", re.M)


def _index() -> list[tuple[str, str, list[str]]]:
    text = (ROOT / "bench" / "RESULTS.md").read_text()
    return [(name, bench, re.findall(r"`([\w.-]+\.json)`", files))
            for name, bench, files in ROW.findall(text)]  # fmt: skip


def _figures(path: Path) -> set[str]:
    return {f["name"] for f in json.loads(path.read_text())["figures"]}


def test_every_written_figure_has_a_row():
    rows = _index()
    assert len(rows) >= 20  # the table parses
    indexed = {(name, f) for name, _, files in rows for f in files}
    results = sorted((ROOT / "bench" / "results").glob("*.json"))
    missing = [f"{p.name}: {n}" for p in results for n in sorted(_figures(p))
               if (n, p.name) not in indexed]  # fmt: skip
    assert missing == []


def test_every_row_names_a_bench_and_a_file_that_holds_the_figure():
    for name, bench, files in _index():
        assert (ROOT / "bench" / f"{bench}.py").exists(), bench
        present = [f for f in files if (ROOT / "bench" / "results" / f).exists()]
        assert present, f"{name}: none of {files} in bench/results/"
        for f in present:
            assert name in _figures(ROOT / "bench" / "results" / f), f"{name} not in {f}"


def test_docstrings_that_cite_a_bench_name_an_indexed_figure_family():
    """The modules whose figures moved here name `bench.choices`, which is indexed."""
    benches = {bench for _, bench, _ in _index()}
    for module in ("buffer/schema.py", "buffer/zarr_store.py", "learner/optim.py"):
        text = (ROOT / "grpo_stream" / module).read_text()
        assert "`bench.choices`" in text and "bench/RESULTS.md" in text, module
    assert "choices" in benches
