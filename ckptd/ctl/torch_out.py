"""``--format torch`` for ``ckptctl restore`` and ``export``, without importing torch in ``ckptd``.

A ``TorchStage`` packs tensors' bytes (streamed, as the safetensors writers stream them) into a
staging file next to the output (``<output's temporary name>.tensors``, each tensor 64-byte
aligned), then runs
``python -m ckptd_client.torch_file`` (the client package, which may import torch) as a child
process with the same interpreter. The child maps the staging file and ``torch.save``-s
``{name: tensor}`` into the output's open file, handed over as an inherited file descriptor; the
caller fsyncs and renames that file as for any other format. The staging file is removed on
success and on error. So the ``ckptd`` package never imports torch (``no-torch`` contract), the
output is the same ``torch.save`` file as before, and the memory held is the reader's pieces plus
the child's mapping of the staging file (page cache, not the child's own memory).

Errors: torch not importable (checked with ``importlib.util.find_spec`` before any byte is
staged, and again by the child) raises the documented ``CkptdError`` ("--format torch needs
PyTorch installed; use --format safetensors", exit code 1); any other failure of the child raises
a ``CkptdError`` with the child's last message.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from ckptd.core.errors import CkptdError

#: The converter module and its protocol (client/ckptd_client/torch_file.py: SCHEMA, NO_TORCH_EXIT).
CONVERTER = "ckptd_client.torch_file"
SCHEMA = "ckptd.torch-file/v1"
NO_TORCH_EXIT = 3
NO_TORCH_MESSAGE = "--format torch needs PyTorch installed; use --format safetensors"
ALIGN_BYTES = 64
CONVERT_TIMEOUT_S = 24 * 3600.0


def require_torch() -> None:
    """Raise the documented error when torch cannot be found (without importing it)."""
    try:
        spec = importlib.util.find_spec("torch")
    except (ImportError, ValueError):  # a finder that refuses it, or a broken entry in sys.modules
        spec = None
    if spec is None:
        raise CkptdError(NO_TORCH_MESSAGE)


class TorchStage:
    """The staging file of one torch output: ``add`` each tensor, then ``write_to`` the output."""

    def __init__(self, output: Path) -> None:
        """output: the path of the (temporary) output file; the staging file goes beside it."""
        require_torch()
        self.path = output.with_name(f"{output.name}.tensors")
        self._f: IO[bytes] = open(self.path, "wb")
        self._pos = 0
        self._tensors: list[dict[str, Any]] = []

    def add(self, name: str, dtype: str, shape: tuple[int, ...], nbytes: int, blocks: Iterable[memoryview],
            advance: Callable[[int], None]) -> int:
        """Stage one tensor from its bytes in row-major order; return the bytes written."""
        pad = -self._pos % ALIGN_BYTES
        if pad and nbytes:
            self._f.write(b"\0" * pad)
            self._pos += pad
        written = 0
        for block in blocks:
            self._f.write(block)
            written += len(block)
            advance(len(block))
        if written != nbytes:
            raise CkptdError(f"{name!r}: staged {written} bytes, expected {nbytes}")
        self._tensors.append({"name": name, "dtype": dtype, "shape": list(shape), "offset": self._pos,
                              "nbytes": nbytes})
        self._pos += nbytes
        return written

    def write_to(self, out: IO[bytes]) -> None:
        """Run the converter: ``torch.save`` of the staged tensors into ``out`` (a real file)."""
        self._f.close()
        out.flush()
        spec = json.dumps({"schema": SCHEMA, "data": str(self.path), "tensors": self._tensors})
        fd = out.fileno()
        try:
            res = subprocess.run([sys.executable, "-m", CONVERTER, "--out-fd", str(fd)], input=spec.encode(),
                                 pass_fds=(fd,), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                 timeout=CONVERT_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            raise CkptdError(f"writing the torch file took over {CONVERT_TIMEOUT_S:.0f}s") from None
        if res.returncode == NO_TORCH_EXIT:
            raise CkptdError(NO_TORCH_MESSAGE)
        if res.returncode != 0:
            lines = res.stderr.decode(errors="replace").strip().splitlines()
            raise CkptdError(f"writing the torch file failed (exit {res.returncode}): "
                             f"{lines[-1] if lines else 'no message'}")
        out.seek(0, os.SEEK_END)  # the child wrote through its own descriptor

    def __enter__(self) -> TorchStage:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self._f.close()
        self.path.unlink(missing_ok=True)
