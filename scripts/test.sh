#!/usr/bin/env bash
# The README's test command: installs what is needed, then runs the whole suite, one file per
# worker on two workers (compilation, most of the tests' time, is single-threaded).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest -q -n "${JAXGEN_TEST_WORKERS:-2}" --dist loadfile tests "$@"
