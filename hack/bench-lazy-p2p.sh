#!/usr/bin/env bash
# make bench-lazy-p2p: the python image started lazily (pull + python3 -V)
# with the registry behind a shaped link (+10 ms per request), background
# fetch off, fresh state per run: one node alone; scheduler + seed + one
# node; three nodes at once; a fourth node afterwards. Prints the median of
# STARLING_BENCH_RUNS (default 3) and the ratios against one node alone.
#   STARLING_BENCH_RATE   link rate, tc syntax (default 100mbit)
set -euo pipefail
. "$(dirname "$0")/lib/common.sh"
. "$(dirname "$0")/lib/debian-image.sh"
layout=$(debian_image demo-python "ca-certificates" "python3")
cd "$ROOT_DIR"
STARLING_BENCH_LAYOUT="$layout" STARLING_BIN="$BIN" \
	go test -tags bench -count=1 -run '^TestBenchLazyP2P$' -v -timeout 60m ./test/p2p 2>&1 |
	grep --line-buffered -E '^(bench-|  [a-z]|    lazybench_test|--- |ok|FAIL|panic)' || true
