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
((${#specs[@]})) || specs=("timm==$("$PYTHON" -c 'import timm; print(timm.__version__)')")
rm -f wheels/*.whl
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --dest wheels "${specs[@]}"
ls -l wheels
