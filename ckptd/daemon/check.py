"""What ``ckptd serve --check`` prints: the resolved configuration as TOML or JSON.

``resolved`` is the whole config as plain data: every key of every section, the socket and shm
directory the daemon would use (not the empty defaults), paths as strings, secrets masked.
``to_toml`` renders it so that ``config.load`` reads it back to the same config (secrets excepted).
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any, Final

from ckptd.core.config import REDACTED, SECRET_KEYS, Config

SECTION_NAMES: Final = ("daemon", "memory", "disk", "metrics", "object", "peers")


def resolved(cfg: Config) -> dict[str, dict[str, Any]]:
    """The whole config as plain data (``ckptd serve --check``): every key of every section, with
    the socket and shm directory the daemon would use, paths as strings, secrets masked."""
    out: dict[str, dict[str, Any]] = {}
    for name in SECTION_NAMES:
        section = getattr(cfg, name)
        values: dict[str, Any] = {}
        for f in fields(section):
            value = getattr(section, f.name)
            if name == "daemon" and f.name == "socket":
                value = cfg.socket_path
            elif name == "daemon" and f.name == "shm_dir":
                value = cfg.shm_path
            if f.name in SECRET_KEYS and value:
                value = REDACTED
            if isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = list(value)
            values[f.name] = value
        out[name] = values
    return out


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):  # a JSON string without \u escapes of surrogates is a TOML basic string
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {type(value).__name__}")


def to_toml(cfg: Config) -> str:
    """``resolved(cfg)`` as a TOML document that ``load`` reads back to the same config (secrets
    excepted: they are masked)."""
    lines: list[str] = []
    for name, values in resolved(cfg).items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
        lines.append("")
    return "\n".join(lines)
