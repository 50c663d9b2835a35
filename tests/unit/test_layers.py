"""The layer rule, read from the source: a layer never imports from a layer above it.

Every module's imports (top level and inside functions alike) are parsed with `ast`:
- `grpo_stream/sync` imports nothing from `learner/` or `generator/`;
- `grpo_stream/buffer`, `algo` and `tasks` import nothing from `generator/`,
  `learner/`, `sync/`, `orchestrate` or `cli`;
- the bottom modules (`errors`, `proc`, `vllm_client`) import no other layer;
- only `grpo_stream/serving/client.py` speaks HTTP (aiohttp, urllib.request, requests,
  http.client): everything that talks to vLLM goes through it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "grpo_stream"
REPO = PKG.parent
HTTP_MODULES = ("aiohttp", "urllib.request", "urllib.error", "requests", "http.client", "httpx")


def imported_modules(path: Path, root: Path = REPO) -> list[tuple[int, str]]:
    """(line, absolute module name) for every import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            out += [(node.lineno, base)] + [(node.lineno, f"{base}.{a.name}") for a in node.names]
    return out


def offenders(files: list[Path], banned: tuple[str, ...], root: Path = REPO) -> list[str]:
    return sorted(
        f"{f.relative_to(root)}:{line} imports {name}"
        for f in files
        for line, name in imported_modules(f, root)
        if any(name == b or name.startswith(b + ".") for b in banned)
    )


def modules(*parts: str) -> list[Path]:
    files = []
    for part in parts:
        p = PKG / part
        files += sorted(p.rglob("*.py")) if p.is_dir() else [p.with_suffix(".py")]
    assert files, parts
    return files


RULES = {
    "sync": (("sync",), ("grpo_stream.learner", "grpo_stream.generator")),
    "data": (
        ("buffer", "algo", "tasks"),
        (
            "grpo_stream.generator",
            "grpo_stream.learner",
            "grpo_stream.sync",
            "grpo_stream.run.orchestrate",
            "grpo_stream.cli",
        ),
    ),  # fmt: skip
    "bottom": (
        ("errors", "proc", "vllm_client"),
        (
            "grpo_stream.generator",
            "grpo_stream.learner",
            "grpo_stream.sync",
            "grpo_stream.buffer",
            "grpo_stream.run.orchestrate",
            "grpo_stream.cli",
            "services",
        ),
    ),  # fmt: skip
}


@pytest.mark.parametrize("rule", sorted(RULES))
def test_no_layer_imports_from_above(rule: str) -> None:
    parts, banned = RULES[rule]
    assert offenders(modules(*parts), banned) == []


def test_only_the_client_module_speaks_http() -> None:
    files = [*PKG.rglob("*.py"), *(REPO / "services").rglob("*.py")]
    files = [f for f in files if f != PKG / "vllm_client.py"]
    assert offenders(files, HTTP_MODULES) == []


def test_the_checker_sees_imports_inside_functions_and_relative_ones(tmp_path: Path) -> None:
    """The rule must be able to fail: a lazy import and a relative one are both caught."""
    fake = tmp_path / "grpo_stream" / "sync" / "_layer_probe.py"
    fake.parent.mkdir(parents=True)
    fake.write_text(
        "def f():\n    from grpo_stream.learner.distributed import unwrap\n"
        "from ..generator import pool\n"
    )
    found = offenders([fake], RULES["sync"][1], root=tmp_path)
    assert found == [
        "grpo_stream/sync/_layer_probe.py:2 imports grpo_stream.learner.distributed",
        "grpo_stream/sync/_layer_probe.py:2 imports grpo_stream.learner.distributed.unwrap",
        "grpo_stream/sync/_layer_probe.py:3 imports grpo_stream.generator",
        "grpo_stream/sync/_layer_probe.py:3 imports grpo_stream.generator.pool",
    ]
