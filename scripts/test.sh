#!/usr/bin/env bash
# The test command: lint, type-check, then the whole pytest suite (exit 5, "no tests", is a failure).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m ruff check fedcore protocol bench tests
python3 -m mypy
python3 -m pytest -q --timeout=900 "$@"
