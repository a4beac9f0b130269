#!/usr/bin/env bash
# Install with the test tools and run the whole suite (lint included). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh dev
.venv/bin/ruff check .
.venv/bin/mypy  # storage/ (pyproject.toml [tool.mypy])
.venv/bin/python -m pytest -q "$@"
