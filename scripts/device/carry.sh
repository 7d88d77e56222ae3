#!/usr/bin/env bash
# Packs into .carry/ (ignored by git) what the `device` tool's GPU image lacks to run jaxgen:
# Python 3.12 x86-64 wheels of the packages it does not hold, at the versions .venv tests, and
# the prepared Shakespeare dataset. A device call then names .carry in `carry` and runs a
# script beside this one, which installs the wheels first:
#   bash scripts/device/carry.sh            # here, once per checkout (~10 s, 13 MB)
#   device run, carry=[".carry"]: bash scripts/device/lexinvariant_cipher.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
bash scripts/setup_env.sh >/dev/null
PY=.venv/bin/python
# Not in the device image (its package list: /work/.library/device/KINDS.md), needed by
# jaxgen's configs (ml_collections) and input stack (grain, TFDS); the rest are their needs.
PACKAGES=(array_record dm-tree docstring_parser googleapis-common-protos grain immutabledict
          importlib_resources ml_collections portpicker promise simple-parsing tensorboardX
          tensorflow-datasets tensorflow-metadata termcolor toml)
rm -rf .carry/wheels && mkdir -p .carry/wheels .carry/tfds
# The pins .venv holds for those names, one line each; a name it lacks stops here.
pins=$($PY - "${PACKAGES[@]}" <<'PYEOF'
import re, subprocess, sys
norm = lambda s: re.sub(r'[-_.]+', '-', s).lower()
freeze = subprocess.run([sys.executable, '-m', 'pip', 'list', '--format=freeze'],
                        capture_output=True, text=True, check=True).stdout.splitlines()
held = {norm(line.split('==')[0]): line for line in freeze if '==' in line}
missing = [n for n in sys.argv[1:] if norm(n) not in held]
if missing:
  sys.exit(f'carry.sh: {missing} not in .venv; run bash scripts/setup_env.sh')
print('\n'.join(held[norm(n)] for n in sys.argv[1:]))
PYEOF
)
for pin in $pins; do
  # Binary wheels for the device's Python; a package published only as source (promise) is
  # pure Python and is built into a py3-none-any wheel here.
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 -d .carry/wheels "$pin" 2>/dev/null \
    || $PY -m pip wheel -q --no-deps -w .carry/wheels "$pin" 2>/dev/null \
    || { echo "carry.sh: could not fetch a wheel of $pin" >&2; exit 1; }
done
if ls .carry/wheels/*.whl | grep -v -E 'cp312-cp312-manylinux|-none-any\.whl$'; then
  echo 'carry.sh: the wheels above will not install on the device (Python 3.12, x86-64)' >&2
  exit 1
fi
# The dataset as the trainer prepares it (reused if already there); the token cache is rebuilt
# there in seconds.
data_dir=$($PY -c 'from jaxgen.data import text
cfg = text.text_data_config(); text.prepare(cfg); print(text.data_dir(cfg))' 2>/dev/null | tail -1)
rm -rf .carry/tfds/jaxgen_shakespeare
cp -r "$data_dir/jaxgen_shakespeare" .carry/tfds/
echo "carry.sh: $(ls .carry/wheels | wc -l) wheels and jaxgen_shakespeare in .carry ($(du -sh .carry | cut -f1))"
