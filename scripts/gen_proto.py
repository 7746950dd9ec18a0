"""Regenerate the committed gRPC/protobuf stubs in ckptd/_proto from proto/.

Usage: python scripts/gen_proto.py [--out DIR]

The generated modules import each other as ``ckptd.v1``; that name would collide with the
``ckptd`` package, so the imports are rewritten to ``ckptd._proto.ckptd.v1``. The test suite
runs this into a temporary directory and fails when the committed stubs differ (stale stubs).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from grpc_tools import protoc

REPO = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO / "proto"
DEFAULT_OUT = REPO / "ckptd" / "_proto"


def generate(out: Path) -> list[Path]:
    """Generate stubs for every proto under proto/ into ``out``; return the written files."""
    # protoc finds the mypy-protobuf plugins on PATH: use the ones beside this interpreter.
    bindir = str(Path(sys.executable).parent)
    if bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    out.mkdir(parents=True, exist_ok=True)
    include = str(Path(protoc.__file__).parent / "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    written: list[Path] = []
    for path in sorted(out.rglob("*.py*")):
        if path.suffix not in (".py", ".pyi"):
            continue
        text = path.read_text()
        text = re.sub(r"^from ckptd\.v1 import", "from ckptd._proto.ckptd.v1 import", text, flags=re.M)
        text = re.sub(r"^import ckptd\.v1\.", "import ckptd._proto.ckptd.v1.", text, flags=re.M)
        path.write_text(text)
        written.append(path)
    packages = {out}
    for path in written:
        packages.update(q for q in path.parents if q.is_relative_to(out))
    for pkg in sorted(packages):
        init = pkg / "__init__.py"
        if not init.exists():
            init.write_text('"""Generated protobuf/gRPC stubs; regenerate with scripts/gen_proto.py."""\n')
            written.append(init)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ns = parser.parse_args(argv)
    for path in generate(ns.out):
        print(path.relative_to(ns.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
