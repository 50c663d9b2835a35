"""The layer rule, read from the source: each package imports only what it is allowed.

`scripts/package_graph.py` parses every module's imports (top level and inside
functions, relative ones resolved) and holds the allow-list `ALLOWED`: package -> the
packages it may import. Here:
- every package of `grpo_stream/` is in the allow-list, and imports nothing else;
- no module import cycle, and no package cycle (a lazy import counts);
- only `grpo_stream/serving/client.py` speaks HTTP (aiohttp, urllib.request, requests,
  http.client, httpx): everything that talks to vLLM goes through it;
- the checker itself can fail: a probe tree with an upward import and a cycle is caught.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PKG = REPO / "grpo_stream"
HTTP_MODULES = ("aiohttp", "urllib.request", "urllib.error", "requests", "http.client", "httpx")

_spec = importlib.util.spec_from_file_location("package_graph", REPO / "scripts/package_graph.py")
pg = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pg)


def upward_imports(graph: dict[str, dict[str, int]], allowed: dict[str, set[str]]) -> list[str]:
    """`module:line imports module` for every edge the allow-list does not permit."""
    bad = []
    for mod, edges in graph.items():
        src = pg.package_of(mod)
        for dst_mod, line in edges.items():
            dst = pg.package_of(dst_mod)
            if dst != src and dst not in allowed.get(src, set()):
                bad.append(f"{mod}:{line} imports {dst_mod}")
    return sorted(bad)


def test_every_package_is_in_the_allow_list() -> None:
    packages = {p.name for p in PKG.iterdir() if p.is_dir() and list(p.glob("*.py"))}
    top_modules = sorted(p.name for p in PKG.glob("*.py") if p.name != "__init__.py")
    assert packages == set(pg.ALLOWED), packages ^ set(pg.ALLOWED)
    assert top_modules == []  # every module lives in a layer's package
    for pkg, deps in pg.ALLOWED.items():
        assert deps <= set(pg.ALLOWED) - {pkg}, pkg


def test_no_package_imports_outside_its_allow_list() -> None:
    assert upward_imports(pg.module_graph(), pg.ALLOWED) == []


def test_the_allow_list_is_acyclic_and_the_code_has_no_cycle() -> None:
    graph = pg.module_graph()
    assert pg.cycles(graph) == []
    assert pg.cycles(pg.package_graph(graph)) == []
    assert pg.cycles(pg.ALLOWED) == []  # a layer order exists


def test_only_the_client_module_speaks_http() -> None:
    client = PKG / "serving" / "client.py"
    found = sorted(
        f"{f.relative_to(REPO)}:{line} imports {name}"
        for f in PKG.rglob("*.py")
        if f != client
        for line, name in pg.imports(f)
        if any(name == h or name.startswith(h + ".") for h in HTTP_MODULES)
    )
    assert found == []


def _probe_tree(root: Path) -> Path:
    pkg = root / "grpo_stream"
    for sub in ("core", "sync", "learner"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "core" / "a.py").write_text("def f():\n    from grpo_stream.core import b\n")
    (pkg / "core" / "b.py").write_text("from . import a\n")  # a <-> b, one lazily
    (pkg / "sync" / "probe.py").write_text(
        "def f():\n    from grpo_stream.learner.distributed import unwrap\n"
    )
    (pkg / "learner" / "distributed.py").write_text("from ..core.a import f\n")
    return pkg


def test_the_checker_sees_lazy_relative_imports_and_cycles(tmp_path: Path) -> None:
    """The rule must be able to fail: an upward lazy import and a relative cycle are caught."""
    graph = pg.module_graph(_probe_tree(tmp_path), tmp_path)
    allowed = {"core": set(), "sync": {"core"}, "learner": {"core", "sync"}}
    assert upward_imports(graph, allowed) == [
        "grpo_stream.sync.probe:2 imports grpo_stream.learner.distributed"
    ]
    assert pg.cycles(graph) == [["grpo_stream.core.a", "grpo_stream.core.b"]]
    assert pg.cycles({"x": {"y"}, "y": {"x"}, "z": set()}) == [["x", "y"]]


@pytest.mark.parametrize("script_args", [[], ["--dot"]])
def test_the_graph_script_runs_and_finds_no_cycle(script_args, capsys) -> None:
    assert pg.main(script_args) == 0
    out = capsys.readouterr().out
    assert ("0 cycles" in out) if not script_args else ('"cli" -> "run";' in out)


def test_the_architecture_page_states_the_allow_list() -> None:
    """docs/architecture.md's table is the allow-list, and names every package."""
    text = (REPO / "docs" / "architecture.md").read_text()
    table = text.split("<!-- allowed")[1].split("<!-- /allowed -->")[0]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[0] in pg.ALLOWED:
            rows[cells[0]] = set() if cells[1] == "nothing" else set(cells[1].split(", "))
    assert rows == pg.ALLOWED
    for pkg in pg.ALLOWED:
        assert f"**`{pkg}/`**" in text, pkg
