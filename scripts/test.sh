#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite: unit tests and integration
# tests against the embedded broker, a local Ray and the real TensorFlow model.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
export PATH="$PWD/.tools/bin:$PATH"
status=0
.venv/bin/python -m pytest -q -p no:cacheprovider "$@" || status=$?
if [[ $status -eq 5 ]]; then
    echo "pytest collected no tests: that is a failure here" >&2
    exit 1
fi
exit $status
