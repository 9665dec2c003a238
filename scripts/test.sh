#!/usr/bin/env bash
# Make .venv, install the pinned test tools into it, then run every check:
# ruff (the tests and scripts too), mypy --strict, vermin (the code must run
# on Python 3.8, the oldest the README claims), and the pytest suite against
# a freshly built filechat.pyz.
set -euo pipefail

cd "$(dirname "$0")/.."
venv=${FILECHAT_VENV:-.venv}
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt

"$venv/bin/ruff" check filechat.py build_zipapp.py scripts tests
"$venv/bin/mypy" filechat.py build_zipapp.py
"$venv/bin/vermin" --no-tips --violations --target=3.8- filechat.py build_zipapp.py
"$venv/bin/python" -m pytest "$@"
