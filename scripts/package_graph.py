"""The import graph of grpo_stream, by package and by module, read from the source.

    python scripts/package_graph.py          # prints each package's imports, then cycles
    python scripts/package_graph.py --dot    # the package graph in Graphviz dot

Every import counts, top level or inside a function, relative ones resolved, so a lazy
import that only hides a cycle at run time is still a cycle here. `tests/unit/
test_layers.py` uses these functions to hold the allow-list in `ALLOWED` and to refuse
any module cycle; this script prints the same facts for a person. Exits 1 on a cycle.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "grpo_stream"

# everything below `run`: the roles and what they are built from
BELOW_RUN = {"core", "config", "serving", "algo", "buffer", "tasks", "envs", "sync",
             "generator", "learner", "eval", "rm"}  # fmt: skip
# package -> the packages it may import (besides itself), lowest layer first
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "config": {"core"},
    "serving": {"core", "config"},
    "algo": {"core"},
    "buffer": {"core"},
    "tasks": {"core", "config"},
    "envs": {"core", "config", "tasks"},
    "sync": {"core", "config", "serving"},
    "generator": {"core", "config", "serving", "buffer", "tasks", "envs"},
    "learner": {"core", "config", "serving", "algo", "buffer", "sync"},
    "eval": {"core", "config", "serving", "buffer", "tasks", "generator"},
    "rm": {"core", "config", "serving", "algo", "buffer", "tasks"},
    "run": BELOW_RUN,
    "analysis": {"core", "config", "eval", "run"},
    "cli": BELOW_RUN | {"run", "analysis"},  # the entry point hands off to every layer
}


def module_name(path: Path, root: Path = REPO) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(
    path: Path, root: Path = REPO, modules: set[str] | None = None
) -> list[tuple[int, str]]:
    """(line, absolute dotted name) for every import in the file, relative ones resolved.
    `from a import b` gives `a.b` when that is one of `modules` (a submodule), else `a`
    (b is a name defined in a); without `modules`, both."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = path.relative_to(root).with_suffix("").parts[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package[: len(package) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            subs = [f"{base}.{a.name}" for a in node.names]
            if modules is None:
                out += [(node.lineno, base)] + [(node.lineno, m) for m in subs]
            else:
                found = [m for m in subs if m in modules]
                out += [(node.lineno, m) for m in found]
                if len(found) < len(subs):
                    out.append((node.lineno, base))
    return out


def module_graph(pkg: Path = PKG, root: Path = REPO) -> dict[str, dict[str, int]]:
    """module -> {imported grpo_stream module: first line}. A name that is no module
    (`grpo_stream.generator`, a folder without `__init__`) counts as its nearest parent."""
    files = {module_name(f, root): f for f in sorted(pkg.rglob("*.py"))}
    graph: dict[str, dict[str, int]] = {}
    for mod, f in files.items():
        edges: dict[str, int] = {}
        for line, name in imports(f, root, set(files)):
            if not name.startswith("grpo_stream"):
                continue
            while name not in files and "." in name:
                name = name.rpartition(".")[0]
            if name in files and name != mod and name != "grpo_stream":
                edges.setdefault(name, line)
        graph[mod] = edges
    return graph


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def package_graph(graph: dict[str, dict[str, int]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = defaultdict(set)
    for mod, edges in graph.items():
        out[package_of(mod)] |= {package_of(m) for m in edges} - {package_of(mod)}
    return dict(out)


def cycles(graph: dict[str, dict[str, int]] | dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def main(argv: list[str]) -> int:
    graph = module_graph()
    packages = package_graph(graph)
    if "--dot" in argv:
        print("digraph grpo_stream {")
        for p, deps in sorted(packages.items()):
            print("".join(f'  "{p}" -> "{d}";\n' for d in sorted(deps)), end="")
        print("}")
        return 0
    for p in ALLOWED:
        print(f"{p:10} -> {', '.join(sorted(packages.get(p, ()))) or '(nothing)'}")
    found = cycles(graph) + cycles(packages)
    for c in found:
        print("cycle: " + " <-> ".join(c))
    print(f"{len(graph)} modules, {len(packages)} packages, {len(found)} cycles")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
