#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run the demo: train, SIGKILL the trainer, resume, compare.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python examples/demo.py "$@"
