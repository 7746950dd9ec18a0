"""``ckptd serve`` with read faults the daemon's own failpoints do not cover (EIO on read).

    python -m tests.fault.scenarios._faultwrap serve [ckptd serve flags]

With ``CKPTD_TEST_EIO_READ=pattern[,pattern...]`` every read of a file whose path contains one of
the patterns fails with EIO, the way a bad sector answers: the wrapper replaces the built-in
``open`` of the daemon process with one returning, for those paths opened for reading, a file
whose reads raise (and which has no descriptor to map). Nothing else of the daemon changes;
without the variable this is exactly ``ckptd serve``.
"""

from __future__ import annotations

import builtins
import errno
import io
import os
import sys
from typing import Any

from ckptd.daemon.cli import main

PATTERNS = [p for p in os.environ.get("CKPTD_TEST_EIO_READ", "").split(",") if p]


class _BadSectors(io.RawIOBase):
    def __init__(self, f: Any, path: str) -> None:
        self.f = f
        self.path = path

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return int(self.f.seek(offset, whence))

    def tell(self) -> int:
        return int(self.f.tell())

    def readinto(self, b: Any) -> int:
        raise OSError(errno.EIO, os.strerror(errno.EIO) + " (injected read fault)", self.path)

    def fileno(self) -> int:
        raise OSError(errno.EIO, os.strerror(errno.EIO) + " (injected read fault)", self.path)

    def close(self) -> None:
        self.f.close()
        super().close()


_open = builtins.open


def faulty_open(file: Any, mode: str = "r", *args: Any, **kw: Any) -> Any:
    f = _open(file, mode, *args, **kw)
    if "r" in mode and not isinstance(file, int) and any(p in os.fspath(file) for p in PATTERNS):
        return _BadSectors(f, os.fspath(file))
    return f


if PATTERNS:
    builtins.open = faulty_open

if __name__ == "__main__":
    sys.exit(main())
