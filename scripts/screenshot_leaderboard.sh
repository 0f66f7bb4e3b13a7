#!/usr/bin/env bash
# Render the leaderboard page in a real browser (headless Chromium from the system's packages:
# `apt-get install chromium`) and save a screenshot: the check that the page reads as intended.
# Usage: scripts/screenshot_leaderboard.sh [page.html] [out.png]
set -euo pipefail
cd "$(dirname "$0")/.."
page=$(realpath "${1:-leaderboard/index.html}")
out=$(realpath -m "${2:-leaderboard/screenshot.png}")
browser=$(command -v chromium || command -v chromium-browser || true)
if [ -z "$browser" ]; then
  echo "error: no chromium on PATH; install the system's package (apt-get install chromium)" >&2
  exit 2
fi
"$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1600,2600 \
  --screenshot="$out" "file://$page" 2>/dev/null
echo "wrote $out"
