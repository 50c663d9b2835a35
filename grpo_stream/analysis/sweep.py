"""`grpo-stream sweep SWEEP.toml`: one normal run folder per point of a grid of config
overrides, run one after another on this machine, every point on the same budget.

    grpo-stream sweep configs/sweeps/epochs.toml            # run (or finish) the sweep
    grpo-stream sweep configs/sweeps/epochs.toml --dry-run  # list points, state, commands

SWEEP.toml (paths relative to the SWEEP file, except `out_dir`: relative to the cwd):

    [sweep]
    base = "../cpu.toml"                 # the base config of every point
    out_dir = "runs/sweeps/epochs"       # default runs/sweeps/<file stem>
    overrides = ["eval.every=0"]         # for every point, before the point's own
    keep_weights = false                 # delete a done point's checkpoints/ and weights/
    compare = true                       # then `grpo-stream compare` into OUT/compare
    doc = "../../docs/experiments.md"    # ... and into its section named by the file stem
    title = "μ epochs per batch"         # the section's heading

    [sweep.budget]                       # the same for every point; one of:
    samples = 192                        # -> learner.max_steps = ceil(samples / (batch_groups * G))
    wall_s = 600                         # -> learner.max_wall_s (max_steps = budget.max_steps)

    [sweep.labels]                       # short names in point names (default: last key part)
    "loss.behaviour_correction" = "correction"

    [sweep.bundles.model]                # an axis of named override sets: `model = [...]`
    actor = { "loss.beta" = 0.0 }
    actor_ref = { "loss.beta" = 0.04, "loss.kl_estimator" = "k3" }

    [[sweep.grid]]                       # one or more grids: the points are their union
    "learner.epochs" = [1, 2, 4]
    "run.seed" = [0, 1]

    [[sweep.exclude]]                    # leave out the points matching every key here
    "learner.epochs" = 4

Point names come from the point's values in axis order (the order in which the grids
first name each key): `epochs=2,correction=tis,seed=0`. Each point runs `grpo-stream run
--config BASE OVERRIDES... run.run_dir=OUT/NAME` in a subprocess. On success the sweep
writes `OUT/NAME/sweep_done.json` (with the overrides it ran with); a later `sweep` skips
such points. A point folder without it (killed, failed), or whose marker records other
overrides (the sweep file or its budget changed since), is deleted and the point starts
over in a fresh folder, so each point's curves (and its wall clock) come from one
uninterrupted run with the current settings. A failed point
is reported and the sweep goes on; it exits 1 if any point failed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grpo_stream.analysis.compare import SWEEP_DONE_FILE
from grpo_stream.config import SECRET_FIELDS, Config, load_config
from grpo_stream.core import jsonl
from grpo_stream.core.atomic import atomic_write
from grpo_stream.core.errors import UserError

DONE_FILE = SWEEP_DONE_FILE  # one name, read by compare too
BUDGET_KEYS = ("samples", "wall_s")


class SweepError(UserError, ValueError):
    """A sweep file that cannot be run; the message names the file and field."""


@dataclass
class Point:
    name: str
    choice: dict[str, Any]  # axis -> value (a bundle axis: the bundle's name)
    overrides: list[str]  # `key=value` for `grpo-stream run`, in axis order
    budget: list[str] = field(default_factory=list)  # learner.max_steps / max_wall_s


@dataclass
class Sweep:
    path: Path
    base: Path
    out_dir: Path
    fixed: list[str]
    budget: dict[str, float]
    labels: dict[str, str]
    bundles: dict[str, dict[str, dict[str, Any]]]
    grids: list[dict[str, list]]
    exclude: list[dict[str, Any]]
    keep_weights: bool = False
    compare: bool = True
    doc: Path | None = None
    title: str | None = None


def flatten(table: dict, prefix: str = "") -> dict[str, Any]:
    """{"learner": {"epochs": [1]}} and {"learner.epochs": [1]} -> {"learner.epochs": [1]}."""
    out: dict[str, Any] = {}
    for k, v in table.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out |= flatten(v, key + ".")
        else:
            out[key] = v
    return out


def toml_value(v: Any) -> str:
    """A value as a TOML inline value, as `key=value` overrides take it."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise SweepError(f"cannot write {v!r} as a TOML value")


def _label_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v).replace("/", "_").replace(" ", "")


def load_sweep(path: str | Path) -> Sweep:
    p = Path(path)
    if not p.is_file():
        raise SweepError(f"sweep file not found: {p}")
    try:
        data = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise SweepError(f"{p} is not valid TOML: {e}") from None
    s = data.get("sweep")
    if not isinstance(s, dict):
        raise SweepError(f"{p}: no [sweep] table")
    unknown = set(s) - {"base", "out_dir", "overrides", "keep_weights", "compare", "budget",
                        "labels", "bundles", "grid", "exclude", "name", "doc", "title"}  # fmt: skip
    if unknown:
        raise SweepError(f"{p}: unknown sweep field(s) {sorted(unknown)}")
    if "base" not in s:
        raise SweepError(f"{p}: sweep.base (the base config) is missing")
    grids = s.get("grid", [])
    grids = [grids] if isinstance(grids, dict) else grids
    if not grids:
        raise SweepError(f"{p}: no [[sweep.grid]]")
    sweep = Sweep(
        path=p,
        base=(p.parent / s["base"]).resolve(),
        out_dir=Path(s.get("out_dir", f"runs/sweeps/{s.get('name', p.stem)}")),
        fixed=list(s.get("overrides", [])),
        budget=dict(s.get("budget", {})),
        labels=dict(s.get("labels", {})),
        bundles={k: {n: flatten(b) for n, b in v.items()} for k, v in s.get("bundles", {}).items()},
        grids=[flatten(g) for g in grids],
        exclude=[flatten(e) for e in s.get("exclude", [])],
        keep_weights=bool(s.get("keep_weights", False)),
        compare=bool(s.get("compare", True)),
        doc=(p.parent / s["doc"]).resolve() if "doc" in s else None,
        title=s.get("title", s.get("name", p.stem)),
    )
    _check(sweep)
    return sweep


def _check(sw: Sweep) -> None:
    p = sw.path
    if not sw.base.is_file():
        raise SweepError(f"{p}: sweep.base: config file not found: {sw.base}")
    chosen = [k for k in BUDGET_KEYS if k in sw.budget]
    if len(chosen) != 1:
        raise SweepError(f"{p}: sweep.budget needs exactly one of {BUDGET_KEYS} (got {chosen})")
    if extra := set(sw.budget) - {*BUDGET_KEYS, "max_steps"}:
        raise SweepError(f"{p}: sweep.budget: unknown field(s) {sorted(extra)}")
    for i, g in enumerate(sw.grids):
        for k, values in g.items():
            if not isinstance(values, list) or not values:
                raise SweepError(f"{p}: sweep.grid[{i}].{k}: a non-empty list of values")
            if "." not in k and k not in sw.bundles:
                raise SweepError(f"{p}: sweep.grid[{i}].{k}: no [sweep.bundles.{k}] and not a "
                                 "dotted config key")  # fmt: skip
            for v in values if k in sw.bundles else []:
                if v not in sw.bundles[k]:
                    raise SweepError(f"{p}: sweep.grid[{i}].{k}: no bundle {v!r} in "
                                     f"[sweep.bundles.{k}]")  # fmt: skip
    _check_no_secret(sw)
    labels = [label(sw, k) for k in axes(sw)]
    if len(set(labels)) != len(labels):
        raise SweepError(f"{p}: axes share a short name {labels}: set [sweep.labels]")


def _check_no_secret(sw: Sweep) -> None:
    """A secret (`server.api_key`) is no sweep override: it would be recorded in every
    sweep_done.json and shown in the process list (argv)."""
    keys = [o.split("=", 1)[0].strip() for o in sw.fixed]
    keys += [k for g in sw.grids for k in g]
    keys += [k for b in sw.bundles.values() for o in b.values() for k in o]
    for k in keys:
        if k in SECRET_FIELDS:
            raise SweepError(f"{sw.path}: {k}: a secret is not a sweep override (it would be "
                             "written to sweep_done.json and shown in argv); name its "
                             "variable instead: server.api_key_env")  # fmt: skip


def axes(sw: Sweep) -> list[str]:
    """Every grid key, in the order the grids first name it."""
    return list(dict.fromkeys(k for g in sw.grids for k in g))


def label(sw: Sweep, key: str) -> str:
    return sw.labels.get(key, key.rsplit(".", 1)[-1])


def point_name(sw: Sweep, choice: dict[str, Any]) -> str:
    return ",".join(f"{label(sw, k)}={_label_value(choice[k])}" for k in axes(sw) if k in choice)


def _overrides(sw: Sweep, choice: dict[str, Any]) -> list[str]:
    out = []
    for k in axes(sw):
        if k not in choice:
            continue
        pairs = sw.bundles[k][choice[k]].items() if k in sw.bundles else [(k, choice[k])]
        out += [f"{key}={toml_value(v)}" for key, v in pairs]
    return out


def _excluded(sw: Sweep, choice: dict[str, Any]) -> bool:
    return any(all(k in choice and choice[k] == v for k, v in e.items()) for e in sw.exclude)


def expand(sw: Sweep) -> list[Point]:
    """The points of the union of the grids, minus the excluded ones, each once, with
    its budget from its own resolved config (a bad override fails here, by point)."""
    points: dict[str, Point] = {}
    order = axes(sw)
    for g in sw.grids:
        keys = [k for k in order if k in g]
        for combo in itertools.product(*(g[k] for k in keys)):
            choice = dict(zip(keys, combo, strict=True))
            name = point_name(sw, choice)
            if _excluded(sw, choice) or name in points:
                continue
            points[name] = Point(name, choice, _overrides(sw, choice))
    for pt in points.values():
        pt.budget = budget_overrides(sw, pt)
    return list(points.values())


def point_config(sw: Sweep, pt: Point, extra: list[str] = ()) -> Config:
    try:
        return load_config(sw.base, [*sw.fixed, *pt.overrides, *extra])
    except UserError as e:
        raise SweepError(f"{sw.path}: point {pt.name}: {e}") from None


def budget_overrides(sw: Sweep, pt: Point) -> list[str]:
    """learner.max_steps for a samples budget (whole steps, rounded up: every point trains
    at least `samples`), or learner.max_wall_s (and a step cap) for a wall-time budget."""
    if "samples" in sw.budget:
        cfg = point_config(sw, pt)
        per_step = cfg.learner.batch_groups * cfg.generator.group_size
        return [f"learner.max_steps={math.ceil(sw.budget['samples'] / per_step)}"]
    cap = int(sw.budget.get("max_steps", 100_000))
    return [f"learner.max_wall_s={float(sw.budget['wall_s'])}", f"learner.max_steps={cap}"]


def point_dir(sw: Sweep, pt: Point) -> Path:
    return sw.out_dir / pt.name


def all_overrides(sw: Sweep, pt: Point) -> list[str]:
    """What the point runs with, besides its run folder (recorded in its done marker)."""
    return [*sw.fixed, *pt.overrides, *pt.budget]


def _marker(sw: Sweep, pt: Point) -> dict | None:
    try:
        return json.loads((point_dir(sw, pt) / DONE_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def state(sw: Sweep, pt: Point) -> str:
    """done (finished with the overrides it would run with now), changed (finished with
    others: the sweep file was edited since), partial (no done marker) or new."""
    marker = _marker(sw, pt)
    if marker is not None:
        return "done" if marker.get("overrides") == all_overrides(sw, pt) else "changed"
    return "partial" if point_dir(sw, pt).exists() else "new"


def is_done(sw: Sweep, pt: Point) -> bool:
    return state(sw, pt) == "done"


def argv_of(sw: Sweep, pt: Point) -> list[str]:
    run_dir = f"run.run_dir={toml_value(str(point_dir(sw, pt).resolve()))}"
    return [sys.executable, "-m", "grpo_stream.cli", "run", "--config", str(sw.base),
            *all_overrides(sw, pt), run_dir]  # fmt: skip


def launch_subprocess(argv: list[str], run_dir: Path) -> int:
    """The real launcher: `grpo-stream run` in a child process, its output on ours."""
    return subprocess.run(argv).returncode


Launcher = Callable[[list[str], Path], int]


def run_point(sw: Sweep, pt: Point, launch: Launcher) -> bool:
    rd = point_dir(sw, pt)
    if rd.exists():  # partial or changed: start over, so its curves come from one run
        shutil.rmtree(rd)
    t0 = time.time()
    code = launch(argv_of(sw, pt), rd)
    metrics = rd / "metrics.jsonl"
    steps = len(jsonl.read(metrics))  # a torn last line (a killed learner) is no step
    if code != 0 or steps == 0:
        print(f"[sweep] point {pt.name} FAILED (exit {code}, {steps} steps); see {rd}/logs",
              flush=True)  # fmt: skip
        return False
    if not sw.keep_weights:  # compare reads metrics, eval and config only: free the disk
        for sub in ("checkpoints", "weights"):
            shutil.rmtree(rd / sub, ignore_errors=True)
    record = {"point": pt.name, "choice": pt.choice, "overrides": all_overrides(sw, pt),
              "steps": steps, "wall_s": time.time() - t0, "finished": time.time()}  # fmt: skip
    atomic_write(rd / DONE_FILE, json.dumps(record, indent=1) + "\n")  # whole, or not done
    return True


def run_sweep(sw: Sweep, launch: Launcher = launch_subprocess) -> tuple[list[Point], list[Point]]:
    """Runs every point not done yet, one after another; (points run, points failed)."""
    points = expand(sw)
    todo = [pt for pt in points if not is_done(sw, pt)]
    print(f"[sweep] {sw.path}: {len(points)} points, {len(points) - len(todo)} done, "
          f"{len(todo)} to run into {sw.out_dir}", flush=True)  # fmt: skip
    sw.out_dir.mkdir(parents=True, exist_ok=True)
    failed = []
    for i, pt in enumerate(todo, 1):
        print(f"[sweep] point {i}/{len(todo)}: {pt.name} ({' '.join(pt.budget)})", flush=True)
        if not run_point(sw, pt, launch):
            failed.append(pt)
    return todo, failed


def _dry_run(sw: Sweep) -> None:
    for pt in expand(sw):
        print(f"{state(sw, pt):8s} {pt.name}")
        print("         grpo-stream " + shlex.join(argv_of(sw, pt)[3:]))


def sweep_cli(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="grpo-stream sweep", description=__doc__.split("\n")[0])
    ap.add_argument("sweep", help="the sweep file (TOML, [sweep] table)")
    ap.add_argument("--dry-run", action="store_true", help="list points and commands only")
    args = ap.parse_args(argv)
    sw = load_sweep(args.sweep)
    if args.dry_run:
        _dry_run(sw)
        return 0
    _, failed = run_sweep(sw)
    done = [point_dir(sw, pt) for pt in expand(sw) if is_done(sw, pt)]
    if sw.compare and len(done) >= 1:
        from grpo_stream.analysis.compare_cli import compare_cli

        doc = ["--write-doc", str(sw.doc), "--section", sw.path.stem] if sw.doc else []
        compare_cli([*map(str, done), "--out", str(sw.out_dir / "compare"), "--title", sw.title,
                     *doc])  # fmt: skip
    if failed:
        print(f"[sweep] {len(failed)} point(s) failed: {', '.join(p.name for p in failed)}; "
              "run the sweep again to retry them", flush=True)  # fmt: skip
        return 1
    print(f"[sweep] all points done: {sw.out_dir}", flush=True)
    return 0
