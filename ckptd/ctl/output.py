"""Output helpers of ``ckptctl``: plain tables, JSON documents, sizes and the progress bar.

Data goes to stdout, messages to stderr. Tables are plain aligned text (bold headers only when
stdout is a terminal and ``NO_COLOR`` is unset); JSON documents carry a ``schema`` name such as
``ckptctl.ls/v1`` (documented in docs/cli.md). The progress bar (bytes, rate, ETA) draws on
stderr with carriage returns, only when it is enabled: stderr is a terminal, the output is not
JSON, and ``--no-progress`` was not given. No third-party dependency.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'; exact bytes below 1 KiB."""
    if n < 1024:
        return f"{int(n)} B"
    value = float(n)
    for unit in _UNITS[1:]:
        value /= 1024
        if value < 1024 or unit == _UNITS[-1]:
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def human_duration(seconds: float) -> str:
    seconds = max(0, int(seconds + 0.5))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def color_enabled(stream: TextIO) -> bool:
    """Styling only on a terminal, never with NO_COLOR set (any value) or TERM=dumb."""
    if "NO_COLOR" in os.environ or os.environ.get("TERM") == "dumb":
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def render_table(headers: Sequence[str], rows: Sequence[Sequence[object]], right: Sequence[int] = (),
                 stream: TextIO | None = None) -> None:
    """Print an aligned table; column indexes in ``right`` are right-aligned (numbers)."""
    out = stream or sys.stdout
    cells = [[str(c) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, c in enumerate(row):
            widths[i] = max(widths[i], len(c))

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(widths[i]) if i in right else v.ljust(widths[i]) for i, v in enumerate(values)]
        return "  ".join(parts).rstrip()

    head = line(list(headers))
    if color_enabled(out):
        head = f"\x1b[1m{head}\x1b[0m"
    out.write(head + "\n")
    for row in cells:
        out.write(line(row) + "\n")


def render_fields(pairs: Sequence[tuple[str, object]], stream: TextIO | None = None) -> None:
    """Print ``key: value`` lines with aligned values."""
    out = stream or sys.stdout
    width = max((len(k) for k, _ in pairs), default=0) + 1
    for key, value in pairs:
        out.write(f"{(key + ':').ljust(width)}  {value}\n")


def emit_json(doc: dict[str, Any], stream: TextIO | None = None) -> None:
    out = stream or sys.stdout
    out.write(json.dumps(doc, indent=2, ensure_ascii=False, allow_nan=False) + "\n")


def message(text: str) -> None:
    """A message for a person: stderr, prefixed with the program name."""
    sys.stderr.write(f"ckptctl: {text}\n")
    sys.stderr.flush()


class Progress:
    """A byte progress bar on stderr: ``label  42% [=====>    ] 1.2 GiB/2.9 GiB  310 MiB/s  ETA 00:05``.

    Disabled instances do nothing, so callers never test ``enabled`` themselves.
    """

    BAR_WIDTH = 24
    INTERVAL_S = 0.1

    def __init__(self, label: str, total: int, enabled: bool, stream: TextIO | None = None) -> None:
        self.label = label
        self.detail = ""
        self.total = max(0, total)
        self.done = 0
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.t0 = time.monotonic()
        self._last_draw = 0.0
        self._last_len = 0
        self._closed = False

    def set_detail(self, detail: str) -> None:
        """What is being worked on now, shown after the label."""
        self.detail = detail
        self._draw(force=False)

    def advance(self, n: int) -> None:
        self.done = min(self.total, self.done + n) if self.total else self.done + n
        self._draw(force=self._last_draw == 0.0)

    def _line(self) -> str:
        elapsed = max(time.monotonic() - self.t0, 1e-6)
        rate = self.done / elapsed
        frac = self.done / self.total if self.total else 1.0
        filled = int(frac * self.BAR_WIDTH)
        bar = "=" * filled + (">" if filled < self.BAR_WIDTH else "") + " " * (self.BAR_WIDTH - filled - 1)
        bar = bar[: self.BAR_WIDTH]
        eta = (self.total - self.done) / rate if rate > 0 and self.total else 0.0
        label = f"{self.label} {self.detail}" if self.detail else self.label
        return (f"{label}  {frac * 100:3.0f}% [{bar}] {human_bytes(self.done)}/{human_bytes(self.total)}"
                f"  {human_bytes(rate)}/s  ETA {human_duration(eta)}")

    def _draw(self, force: bool) -> None:
        if not self.enabled or self._closed:
            return
        now = time.monotonic()
        if not force and now - self._last_draw < self.INTERVAL_S:
            return
        self._last_draw = now
        text = self._line()
        pad = " " * max(0, self._last_len - len(text))
        self._last_len = len(text)
        try:
            self.stream.write("\r" + text + pad)
            self.stream.flush()
        except (OSError, ValueError):
            self.enabled = False

    def close(self) -> None:
        """Draw the final state and end the line (no-op when disabled or closed)."""
        if self.enabled and not self._closed:
            self._draw(force=True)
            try:
                self.stream.write("\n")
                self.stream.flush()
            except (OSError, ValueError):
                pass
        self._closed = True

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
