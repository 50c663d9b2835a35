"""Guard: every leaf field of `Config` is read by the code it names ("a setting is a
promise"). A field kept for the future, or one nothing reads any more, fails here.

A field `section.name` counts as read where a product module outside the config modules
(grpo_stream/config*.py) has `.section.name`, or has `.name` / `"name"` while also
reaching the section itself (`.section`, its class name, or its home package). A few fields reach their code through a method of their
section (`BufferConfig.writer_opts()`): they count as read only where that method is
called outside the config modules.
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel

from grpo_stream.config import Config

ROOT = Path(__file__).parents[2]

# (section, field) -> the section method that hands it to its code
VIA_METHOD = {
    **{
        ("buffer", name): "writer_opts"
        for name in ("fsync", "max_groups", "max_age_s", "rollup_segments", "rollup_target_groups")
    },
    ("server", "api_key"): "resolved_api_key",
    ("server", "api_key_env"): "resolved_api_key",
}

# Sections handed whole to a package whose functions read them as `cfg.<field>`: files
# there reach the section without naming it (learner/step.py: grpo_loss(cfg.loss, ...),
# compute_advantages(rewards, cfg.loss)).
SECTION_HOMES = {"loss": "grpo_stream/algo/"}

# Read generically, not by name: each entry says where.
READ_GENERICALLY: dict[tuple[str, str], str] = {
    # RewardFunctionConfig's fields travel to the reward workers as JSON
    # (tasks/runner.py: cfg.model_dump_json()) and are read there as spec["..."] / .attr
}


# where fields are defined and printed, so a mention there is no read
CONFIG_MODULES = {
    ROOT / "grpo_stream" / "config" / name
    for name in (
        "__init__.py",
        "sections.py",
        "learning.py",
        "evaluation.py",
        "show.py",
        "reward_model.py",
    )
}


def _product_sources() -> dict[Path, str]:
    files = [*(ROOT / "grpo_stream").rglob("*.py")]
    return {p: p.read_text() for p in files if p not in CONFIG_MODULES}


def _leaf_fields(model: type[BaseModel], section: str | None = None):
    for name, field in model.model_fields.items():
        sub = _model_of(field.annotation)
        if sub is not None and section is not None and sub in _SECTION_MODELS:
            continue  # e.g. eval.task: a TaskConfig, whose fields `task` checks
        if sub is not None:
            yield from _leaf_fields(sub, section or name)
        elif section is not None:
            yield section, name


def _model_of(annotation) -> type[BaseModel] | None:
    import typing

    for cand in (annotation, *typing.get_args(annotation)):
        if isinstance(cand, type) and issubclass(cand, BaseModel):
            return cand
    return None


_SECTION_MODELS = {_model_of(f.annotation) for f in Config.model_fields.values()}


def _section_classes(section: str) -> list[str]:
    model = _model_of(Config.model_fields[section].annotation)
    names = [model.__name__]
    for f in model.model_fields.values():
        sub = _model_of(f.annotation)
        if sub is not None:
            names.append(sub.__name__)
    return names


def _is_read(section: str, name: str, sources: dict[Path, str]) -> bool:
    direct = re.compile(rf"\.{section}\.{name}\b")
    attr = re.compile(rf"(\.{name}\b|[\"']{name}[\"'])")
    owner = re.compile(rf"\.{section}\b(?!\.\w+ import)|" + "|".join(_section_classes(section)))
    home = SECTION_HOMES.get(section)

    def owns(path: Path, text: str) -> bool:
        in_home = home is not None and path.relative_to(ROOT).as_posix().startswith(home)
        return in_home or bool(owner.search(text))

    return any(
        direct.search(text) or (attr.search(text) and owns(path, text))
        for path, text in sources.items()
    )


def test_the_guard_sees_all_fields():
    fields = list(_leaf_fields(Config))
    assert len(fields) > 100 and ("buffer", "on_corrupt") in fields
    assert ("reward", "weight") in fields  # fields of reward.functions entries
    sources = _product_sources()
    assert _is_read("buffer", "on_corrupt", sources)
    assert not _is_read("buffer", "kept_for_the_future", sources)
    assert not any(p.name == "config.py" and p.parent.name == "grpo_stream" for p in sources)


def test_every_config_field_is_read_outside_the_config_modules():
    sources = _product_sources()
    unread = []
    for section, name in _leaf_fields(Config):
        if (section, name) in READ_GENERICALLY:
            continue
        method = VIA_METHOD.get((section, name))
        if method is not None:
            called = any(re.search(rf"\.{method}\(", t) for t in sources.values())
            if not called:
                unread.append(f"{section}.{name} (via {method}(), which nothing calls)")
            continue
        if not _is_read(section, name, sources):
            unread.append(f"{section}.{name}")
    assert unread == []
