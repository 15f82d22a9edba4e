#!/usr/bin/env bash
# Installs what is needed, then runs the demo (bench/demo.py); arguments go to the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/python -m bench.demo "$@"
