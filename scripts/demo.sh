#!/usr/bin/env bash
# Quickstart: install, then `labeler demo`: scenes with ground truth, a fitted teacher, labels
# scored against the masks, picture panels and a small LV-ViT trained on the token labels.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
.venv/bin/labeler demo "$@"
