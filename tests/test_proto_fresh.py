"""The committed stubs in ckptd/_proto are exactly what scripts/gen_proto.py generates from proto/."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests._ckptd_helpers import REPO

COMMITTED = REPO / "ckptd" / "_proto"


def tree_files(root: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every file under root (bytecode caches left out)."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }


def stale(generated: dict[str, bytes], committed: dict[str, bytes]) -> list[str]:
    """What differs between a fresh generation and the committed stubs, as readable lines."""
    out = [f"missing from ckptd/_proto: {p}" for p in sorted(set(generated) - set(committed))]
    out += [f"not generated any more: {p}" for p in sorted(set(committed) - set(generated))]
    out += [f"stale: {p}" for p in sorted(set(generated) & set(committed)) if generated[p] != committed[p]]
    return out


def generate(script: Path, out: Path) -> dict[str, bytes]:
    res = subprocess.run([sys.executable, str(script), "--out", str(out)], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    return tree_files(out)


def test_committed_stubs_are_fresh(tmp_path: Path) -> None:
    generated = generate(REPO / "scripts" / "gen_proto.py", tmp_path / "out")
    assert any(p.endswith("_pb2.py") for p in generated)
    assert any(p.endswith("_pb2_grpc.py") for p in generated)
    assert any(p.endswith(".pyi") for p in generated)
    problems = stale(generated, tree_files(COMMITTED))
    assert not problems, "stubs are stale; run `python scripts/gen_proto.py`:\n" + "\n".join(problems)


def test_generated_stubs_import_from_the_package_path(tmp_path: Path) -> None:
    for name, data in tree_files(COMMITTED).items():
        if name.endswith((".py", ".pyi")):
            text = data.decode()
            assert "\nfrom ckptd.v1 import" not in text and "\nimport ckptd.v1." not in text, name


def test_the_check_catches_a_changed_proto(tmp_path: Path) -> None:
    """A proto edited without regenerating is reported as stale (the check above can fail)."""
    work = tmp_path / "repo"
    shutil.copytree(REPO / "proto", work / "proto")
    (work / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "gen_proto.py", work / "scripts" / "gen_proto.py")
    proto = next((work / "proto").rglob("checkpoint_service.proto"))
    proto.write_text(proto.read_text().replace("message ListJobsRequest {}",
                                               "message ListJobsRequest {\n  string prefix = 1;\n}"))
    problems = stale(generate(work / "scripts" / "gen_proto.py", tmp_path / "out"), tree_files(COMMITTED))
    assert any(p.startswith("stale:") and "checkpoint_service_pb2" in p for p in problems), problems
