"""The daemon's CPU scheduling: a ``nice`` value and a CPU affinity, so it yields to training.

A save's background work (the crc32c pass over every byte, the disk drain, the restore reads)
runs on the cores the training loop computes on. ``daemon.nice`` (0..19) lowers the daemon's
priority so the kernel runs training first when both want a core; ``daemon.cpu_affinity`` (a
Linux CPU list, e.g. ``"6-7"`` or ``"0,2,4-5"``; empty: every CPU the daemon may use) keeps it
off the training cores altogether.

``parse_cpu_list`` checks the syntax (config validation); ``apply`` is called once at start-up,
before the daemon starts any thread (threads inherit both settings from the thread that
creates them), and refuses CPUs the process may not run on with InvalidArgument.
"""

from __future__ import annotations

import os
from typing import Final

from ckptd.core.errors import InvalidArgument

MAX_NICE: Final = 19
MAX_CPU: Final = 4095


def parse_cpu_list(text: str) -> frozenset[int]:
    """The CPUs of a Linux CPU list ("0-3,6"); empty for "". InvalidArgument on bad syntax."""
    cpus: set[int] = set()
    for part in (p.strip() for p in text.split(",")) if text.strip() else ():
        lo, sep, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise InvalidArgument(f"daemon.cpu_affinity: {part!r} is not a CPU number or range") from None
        if not 0 <= a <= b <= MAX_CPU:
            raise InvalidArgument(f"daemon.cpu_affinity: bad range {part!r} (CPUs 0..{MAX_CPU}, low-high)")
        cpus.update(range(a, b + 1))
    return frozenset(cpus)


def validate(nice: int, cpu_affinity: str) -> None:
    if not 0 <= nice <= MAX_NICE:
        raise InvalidArgument(f"daemon.nice must be in [0, {MAX_NICE}], got {nice}")
    parse_cpu_list(cpu_affinity)


def apply(nice: int, cpu_affinity: str) -> None:
    """Lower this process's priority by ``nice`` and pin it to the CPUs listed (if any)."""
    cpus = parse_cpu_list(cpu_affinity)
    if cpus:
        allowed = os.sched_getaffinity(0)
        if not cpus <= allowed:
            raise InvalidArgument(f"daemon.cpu_affinity {cpu_affinity!r} names CPUs this process may not use "
                                  f"(allowed: {sorted(allowed)})")
        os.sched_setaffinity(0, cpus)
    if nice:
        os.nice(nice)


__all__ = ["apply", "parse_cpu_list", "validate"]
