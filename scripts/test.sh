#!/usr/bin/env bash
# Set up (idempotent) and run every test: bash scripts/test.sh [pytest args]
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
bash "$repo/scripts/setup.sh"
source "$repo/env.sh"
cd "$repo"
exec pytest -q "$@"
