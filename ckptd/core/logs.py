"""Logging setup: JSON lines when stderr is not a terminal, readable lines when it is.

Extra fields (job, step, rank, tier) passed with ``extra=`` are carried into the JSON object.
"""

from __future__ import annotations

import json
import logging
import sys
import time

_FIELDS = ("job", "step", "rank", "tier")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        obj = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in _FIELDS:
            if hasattr(record, key):
                obj[key] = getattr(record, key)
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        return json.dumps(obj, default=str)


class ProgressLog:
    """A periodic progress line for a long transfer: bytes done, rate and ETA every interval_s."""

    def __init__(self, logger: logging.Logger, what: str, total_bytes: int, interval_s: float = 5.0,
                 **fields: object) -> None:
        self.logger = logger
        self.what = what
        self.total_bytes = total_bytes
        self.interval_s = interval_s
        self.fields = fields
        self.done_bytes = 0
        self.t0 = self.last = time.monotonic()

    def update(self, nbytes: int) -> None:
        self.done_bytes += nbytes
        now = time.monotonic()
        if now - self.last < self.interval_s or self.done_bytes >= self.total_bytes:
            return
        self.last = now
        rate = self.done_bytes / max(now - self.t0, 1e-9)
        eta = (self.total_bytes - self.done_bytes) / rate if rate else float("inf")
        self.logger.info("%s: %.0f of %.0f MiB (%.0f MiB/s, ETA %.0fs)", self.what, self.done_bytes / 2**20,
                         self.total_bytes / 2**20, rate / 2**20, eta, extra=self.fields)


def setup(level: str = "INFO", json_lines: bool | None = None) -> None:
    if json_lines is None:
        json_lines = not sys.stderr.isatty()
    handler = logging.StreamHandler(sys.stderr)
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        fmt = logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")
        fmt.converter = time.localtime
        handler.setFormatter(fmt)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # botocore/urllib3 at DEBUG print request headers: never let them below WARNING.
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
