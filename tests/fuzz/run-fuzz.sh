#!/usr/bin/env bash
# run-fuzz.sh FUZZER SECONDS CORPUS: fuzzes for SECONDS starting from the committed CORPUS; new
# inputs and crash artifacts go to a scratch dir so the source tree stays untouched.
set -euo pipefail
fuzzer=$1 seconds=$2 corpus=$3
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/new"
"$fuzzer" -max_total_time="$seconds" -rss_limit_mb=1024 -print_final_stats=1 \
  -artifact_prefix="$work/" "$work/new" "$corpus" 2>&1 | tail -15
rc=${PIPESTATUS[0]}
if [ "$rc" -ne 0 ]; then
  for a in "$work"/crash-* "$work"/leak-* "$work"/timeout-*; do
    [ -f "$a" ] && { echo "artifact $a:"; od -c "$a" | head -20; }
  done
fi
exit "$rc"
