"""`grpo-stream config show`: the resolved config as TOML, each field's description above it.

The output loads back as a config (descriptions and unset fields are TOML comments):

    grpo-stream config show --config configs/cpu.toml learner.lr=3e-5 > my.toml
    text = render_config(load_config("configs/cpu.toml"))

A field that is unset shows as `# name = (unset)`, a field the chosen variant ignores
(see `config.rules.VARIANT_RULES`) as `# name = value  (ignored: ...)`, and a secret that is set
(`server.api_key`) as `# api_key = (secret: set, not shown)`. Derived values (the servers'
seed, ...) show unset: they are derived where they are used.
"""

from __future__ import annotations

import textwrap
import typing

import tomli_w
from pydantic import BaseModel, SecretStr

from grpo_stream.config import Config, inapplicable

WIDTH = 88


def _comment(text: str, indent: str = "") -> list[str]:
    return textwrap.wrap(text, WIDTH, initial_indent=f"# {indent}", subsequent_indent="# ")


def _value(name: str, value: object) -> str:
    return tomli_w.dumps({name: value}).rstrip("\n")


def _element_model(annotation: object) -> type[BaseModel] | None:
    """The model of a list-of-tables field (reward.functions), else None."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is list and args and isinstance(args[0], type):
        return args[0] if issubclass(args[0], BaseModel) else None
    return None


def _section_lines(cfg: Config, section: str, data: dict, full: dict) -> list[str]:
    model = type(getattr(cfg, section))
    ignored = inapplicable(cfg)
    lines = ["", f"[{section}]  # {Config.model_fields[section].description}"]
    tables: list[str] = []  # nested sections ([eval.task]) go after the section's keys
    for name, field in model.model_fields.items():
        if isinstance(data.get(name), dict) and name not in ignored:
            tables += ["", *_comment(field.description or "")]
            tables.append(tomli_w.dumps({section: {name: data[name]}}).rstrip("\n"))
            continue
        lines += _comment(field.description or "")
        element = _element_model(field.annotation)
        if element is not None:
            for sub, sf in element.model_fields.items():
                lines += _comment(f"{sub}: {sf.description}", indent="  ")
        rule = ignored.get(f"{section}.{name}")
        if rule is not None:
            value = full[name]
            shown = [f"{name} = (unset)"] if value is None else _value(name, value).splitlines()
            lines += [f"# {ln}" for ln in shown]
            lines[-1] += f"  (ignored: applies only with {rule.condition()})"
        elif isinstance(getattr(getattr(cfg, section), name), SecretStr):
            lines.append(f"# {name} = (secret: set, not shown)")
        elif name in data:
            lines.append(_value(name, data[name]))
        else:
            lines.append(f"# {name} = (unset)")
    return lines + tables


def render_config(cfg: Config, source: str = "defaults") -> str:
    """TOML text of `cfg` with every field's description as a comment."""
    data, full = cfg.to_dict(), cfg.model_dump(mode="json")
    data["server"].pop("api_key_env", None)  # the variable in effect, not the one a run
    if cfg.server.api_key_env:  # folder's file names for a literal key
        data["server"]["api_key_env"] = cfg.server.api_key_env
    lines = [
        f"# grpo-stream resolved config (from {source}).",
        "# Every value below is in effect; '# name = ...' lines are unset or ignored.",
    ]
    for section in Config.model_fields:
        lines += _section_lines(cfg, section, data[section], full[section])
    return "\n".join(lines) + "\n"
