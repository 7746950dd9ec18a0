"""Write a ``torch.save`` file of ``{name: tensor}`` from staged tensor bytes: ``ckptctl``'s torch side.

``ckptctl restore|export --format torch`` (``ckptd/ctl/torch_out.py``) packs the tensors' bytes
into a staging file and runs this module as a child process, ``python -m ckptd_client.torch_file
--out-fd N``, with a JSON spec on stdin (``ckptd.torch-file/v1``: the staging file's path and, per
tensor, name, ckptd dtype name, shape, byte offset and byte count, in the output's order). It
writes ``torch.save(dict)`` to the inherited file descriptor N; the parent fsyncs and renames it.
So the ``ckptd`` package never imports torch (the ``no-torch`` import contract holds with no
exception), and this module is the only place of the operator's path that does.

Invariants: the staging file is mapped (``mmap``, private, never written), each tensor is a
``torch.frombuffer`` view of its own bytes there, so ``torch.save`` reads from the page cache and the
child's own memory stays small whatever the model's size; every tensor has its own storage in the
output (as a copy would), never one shared storage. Exit status: 0 written, 3 torch is not
importable (``NO_TORCH_EXIT``; the parent reports it as the documented error), 2 a bad spec, 1
anything else (the message on stderr).
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import sys
from typing import Any

SCHEMA = "ckptd.torch-file/v1"
NO_TORCH_EXIT = 3
BAD_SPEC_EXIT = 2


def _tensors(spec: dict[str, Any], data: mmap.mmap | None, torch: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for t in spec["tensors"]:
        dtype = getattr(torch, t["dtype"])
        shape = tuple(t["shape"])
        if t["nbytes"] == 0 or data is None:
            out[t["name"]] = torch.empty(shape, dtype=dtype)
            continue
        itemsize = torch.empty((), dtype=dtype).element_size()
        flat = torch.frombuffer(data, dtype=dtype, count=t["nbytes"] // itemsize, offset=t["offset"])
        out[t["name"]] = flat.view(shape)
    return out


def write(spec: dict[str, Any], out_fd: int) -> None:
    """torch.save the spec's tensors, mapped from its staging file, to out_fd (left open)."""
    import torch

    with open(spec["data"], "rb") as f:
        size = os.fstat(f.fileno()).st_size
        # ACCESS_COPY: a private mapping, writable as torch.frombuffer wants, never written back.
        data = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) if size else None
    tensors = _tensors(spec, data, torch)
    with os.fdopen(out_fd, "wb", closefd=False) as out:
        torch.save(tensors, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ckptd_client.torch_file", description=__doc__.split("\n")[0])
    parser.add_argument("--out-fd", type=int, required=True, help="file descriptor to write the torch.save file to")
    args = parser.parse_args(argv)
    try:
        import torch  # noqa: F401  (checked before reading anything)
    except ImportError as e:
        print(f"torch is not importable: {e}", file=sys.stderr)
        return NO_TORCH_EXIT
    try:
        spec = json.load(sys.stdin)
        if not isinstance(spec, dict) or spec.get("schema") != SCHEMA:
            raise ValueError(f"expected a {SCHEMA} spec")
    except ValueError as e:
        print(f"bad spec on stdin: {e}", file=sys.stderr)
        return BAD_SPEC_EXIT
    write(spec, args.out_fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
