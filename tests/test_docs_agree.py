"""Docs that restate the code agree with it: every ``--tier`` choice list of docs/cli.md (synopsis
and section headings) is the parser's, and docker/ckptd-node.toml claims no per-node ``CKPTD_*``
variables that docker-compose.yml does not set."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import yaml

from ckptd.ctl.main import build_parser

REPO = Path(__file__).resolve().parent.parent


def _tier_choices() -> dict[str, tuple[str, ...]]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    out = {}
    for name, sp in sub.choices.items():
        for action in sp._actions:
            if "--tier" in action.option_strings and action.choices is not None:
                out[name] = tuple(action.choices)
    return out


def test_every_tier_list_in_cli_md_is_the_parsers() -> None:
    choices = _tier_choices()
    text = (REPO / "docs" / "cli.md").read_text()
    seen = 0
    for line in text.splitlines():
        m = re.match(r"^(?:ckptctl |#+ `)(\w[\w-]*) .*--tier ([a-z|]+)", line)
        if m is None:
            continue
        seen += 1
        cmd, listed = m.group(1), tuple(m.group(2).split("|"))
        assert cmd in choices, line
        assert listed == choices[cmd], f"docs/cli.md: {line!r} lists {listed}, ckptctl {cmd} takes {choices[cmd]}"
    assert seen >= 6  # synopsis and section of verify, gc and rm


def test_node_config_comment_names_no_variables_compose_does_not_set() -> None:
    toml = (REPO / "docker" / "ckptd-node.toml").read_text()
    compose = yaml.safe_load((REPO / "docker" / "docker-compose.yml").read_text())
    env_keys = {k for svc in compose["services"].values() for k in (svc.get("environment") or {})}
    comments = "\n".join(line for line in toml.splitlines() if line.lstrip().startswith("#"))
    if not any(k.startswith("CKPTD_") for k in env_keys):
        assert not re.search(r"come from CKPTD_|per-node values", comments), comments
