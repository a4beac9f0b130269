#!/usr/bin/env bash
# Quickstart: install, make a small sample image folder, register it, label it into ./store.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
.venv/bin/labeler demo "$@"
