# Sourced by the other scripts: make ./.venv (Python >= 3.11) and install the project into it.
# Usage: source scripts/env.sh [EXTRAS]   e.g. "dev" for the test tools.
set -euo pipefail
PYTHON=${PYTHON:-python3}
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { echo "tokenlabel needs Python >= 3.11 (set PYTHON=...)" >&2; exit 1; }
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
extras=${1:+[$1]}
# constraints.txt pins the torch/torchvision pair known to import together.
.venv/bin/python -m pip install --quiet --disable-pip-version-check \
  -c constraints.txt -e ".${extras}"
