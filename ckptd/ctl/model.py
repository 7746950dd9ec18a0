"""The plain types every ``ckptctl`` command shares: identities, step rows, source plans, shard bytes.

``Identity`` (parsed from ``JOB@STEP``, ``JOB@latest`` or ``JOB``), ``StepRow`` (one line of
``ls``), ``Planned`` (one source of a shard, in the order a restore would try it) and ``ShardData``
(a shard's verified bytes). The sources (``ckptd.ctl.source`` for a daemon or a disk root,
``ckptd.ctl.bucket`` for an object store) produce them and the commands consume them; this module
imports neither, so the sources do not import each other's types.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ckptd.core.errors import InvalidArgument
from ckptd.core.types import validate_job, validate_step

_STEP_RE = re.compile(r"[0-9]+", re.ASCII)


@dataclass(frozen=True)
class Identity:
    """``JOB@STEP``; ``step`` is None for ``JOB@latest`` and a bare ``JOB``."""

    job: str
    step: int | None

    def __str__(self) -> str:
        return f"{self.job}@{'latest' if self.step is None else self.step}"


def parse_identity(text: str) -> Identity:
    """Parse ``JOB@STEP``, ``JOB@latest`` or ``JOB``; raise InvalidArgument (exit 2) otherwise."""
    job, sep, step_text = text.partition("@")
    try:
        validate_job(job)
    except ValueError as exc:
        raise InvalidArgument(f"bad identity {text!r}: {exc}") from None
    if not sep or step_text == "latest":
        if sep and not step_text:
            raise InvalidArgument(f"bad identity {text!r}: empty step")
        return Identity(job, None)
    if not _STEP_RE.fullmatch(step_text):
        raise InvalidArgument(f"bad identity {text!r}: step must be a non-negative integer or 'latest'")
    try:
        return Identity(job, validate_step(int(step_text)))
    except ValueError as exc:
        raise InvalidArgument(f"bad identity {text!r}: {exc}") from None


@dataclass
class StepRow:
    """One step as ``ls`` shows it."""

    job: str
    step: int
    world_size: int
    nbytes: int
    committed: bool
    tiers: dict[str, str] = field(default_factory=dict)
    pinned: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"job": self.job, "step": self.step, "world_size": self.world_size, "nbytes": self.nbytes,
                "committed": self.committed, "tiers": dict(self.tiers), "pinned": self.pinned}


@dataclass
class Planned:
    """One source of a shard in the order it would be tried."""

    tier: str
    detail: str


@dataclass
class ShardData:
    """A shard's verified bytes, valid inside ``Source.open_shard``'s ``with`` block."""

    buf: memoryview
    served_from: str
    location: str
    rejected: list[str] = field(default_factory=list)
