#!/usr/bin/env bash
# Pure-Python wheels for a device run, into wheels/ (git-ignored), which the run then carries and
# benchmarks/use_wheels.sh installs there. By default timm, at the release this environment has.
# wheels/ then holds these alone: two releases of one package would stop the install there.
#
#   bash benchmarks/fetch_wheels.sh [NAME==VERSION ...]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
specs=("$@")
if ((${#specs[@]} == 0)); then
    version=$("$PYTHON" -c 'import timm; print(timm.__version__)' 2>/dev/null) || {
        echo "error: $PYTHON has no timm to take the release of; give PYTHON=.venv/bin/python, or NAME==VERSION" >&2
        exit 2
    }
    specs=("timm==$version")
fi
rm -f wheels/*.whl
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --dest wheels "${specs[@]}"
ls -l wheels
