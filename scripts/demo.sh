#!/usr/bin/env bash
# Set up (idempotent) and run the demo: replay a robot-camera bag into the node, print narration
# and answers. Extra arguments go to `python -m livevlm_ros.tools.demo` (--model DIR, --rate R).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
bash "$repo/scripts/setup.sh"
source "$repo/env.sh"
cd "$repo"
exec python -m livevlm_ros.tools.demo "$@"
