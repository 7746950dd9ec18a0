#!/usr/bin/env bash
# Set up (scripts/setup.sh), then lint, type-check, check the import contracts (pyproject.toml,
# [tool.importlinter]) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check ckptd client scripts bench examples tests
.venv/bin/mypy ckptd client/ckptd_client
.venv/bin/lint-imports --no-cache
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=20 "$@"
