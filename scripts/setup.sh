#!/usr/bin/env bash
# Create .venv (Python 3.11) and install exactly requirements.lock (torch 2.13.0 CPU, the daemon,
# s3 and dev extras), then ckptd itself, editable, with no dependency resolution of its own.
# Idempotent: does nothing while the install is newer than pyproject.toml and requirements.lock.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
"$PY" -c 'import sys; assert sys.version_info >= (3, 11), "ckptd needs Python >= 3.11"'
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=.venv/.ckptd-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ requirements.lock -nt "$stamp" ]; then
    pip=(.venv/bin/python -m pip)
    # Remove what an older install left that the lock no longer lists (ckptd itself stays).
    stale=$(.venv/bin/python - <<'PY'
import re, subprocess, sys
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
locked = {norm(l.split("==")[0]) for l in open("requirements.lock") if "==" in l and not l.startswith("#")}
out = subprocess.run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"], check=True,
                     capture_output=True, text=True).stdout
print(" ".join(n for n in (l.split("==")[0] for l in out.splitlines() if "==" in l)
               if norm(n) not in locked | {"ckptd"}))
PY
)
    if [ -n "$stale" ]; then
        # shellcheck disable=SC2086
        "${pip[@]}" uninstall --quiet --yes $stale
    fi
    # --no-deps: the lock is the whole closure; `pip check` below fails if it is not.
    # torch==2.13.0 resolves to the local CPU wheel (2.13.0+cpu), never the CUDA build.
    "${pip[@]}" install --quiet --no-deps -r requirements.lock
    "${pip[@]}" install --quiet --no-deps -e .
    "${pip[@]}" check
    touch "$stamp"
fi
