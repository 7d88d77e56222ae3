#!/usr/bin/env bash
# The README's test command: installs what is needed, then runs the whole suite, one file per
# worker on two workers (compilation, most of the tests' time, is single-threaded), files in
# conftest.py's order, longest first (xdist would otherwise start the files with the most
# tests first and leave the one-test notebook run, ~2.5 min, for the end).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest -q -n "${JAXGEN_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder tests "$@"
