#!/usr/bin/env bash
# Set up a fresh clone: a virtual environment in .venv with modstream and its
# test tools, and the chart tools (helm, kubernetes-validate) in .tools.
# Idempotent: a second run only checks. Needs Python 3.10-3.12 and a C++
# compiler (hnswlib ships as source only).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python="${PYTHON:-python3}"

if [[ ! -x .venv/bin/python ]]; then
    "$python" -m venv .venv
    .venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
fi
# hnswlib compiles with -march=native here (fast, this CPU only); images built for
# other machines set HNSWLIB_NO_NATIVE=1 (see README and deploy/Dockerfile).
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
bash .ci/install-tools.sh .tools
