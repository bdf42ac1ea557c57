#!/usr/bin/env bash
# make bench-lazy-p2p: the python image started lazily (pull + python3 -V)
# with the registry behind a shaped link (+10 ms per request), background
# fetch off, fresh state per run: one node alone; scheduler + seed + one
# node; three nodes at once; a fourth node afterwards. Prints the median of
# STARLING_BENCH_RUNS (default 3) and the ratios against one node alone,
# once against an open registry and once against one that wants credentials
# (docker-registry's htpasswd, basic auth; the nodes have them, the seed not),
# each in plaintext and with mutual TLS (issue 11).
#   STARLING_BENCH_RATE        link rate, tc syntax (default 100mbit)
#   STARLING_BENCH_RUNS        runs per set-up (default 3)
#   STARLING_BENCH_REGISTRIES  open, auth or open,auth (default)
#   STARLING_BENCH_TLS         both (default: every set-up in plaintext and with
#                              every daemon on mutual TLS, then the ratios
#                              mTLS/plaintext, target within 5 %), off or on
set -euo pipefail
. "$(dirname "$0")/lib/common.sh"
. "$(dirname "$0")/lib/debian-image.sh"
layout=$(debian_image demo-python "ca-certificates" "python3")
cd "$ROOT_DIR"
STARLING_BENCH_LAYOUT="$layout" STARLING_BIN="$BIN" \
	go test -tags bench -count=1 -run '^TestBenchLazyP2P$' -v -timeout 180m ./test/p2p 2>&1 |
	grep --line-buffered -E '^(bench-|  [a-z]|    lazybench_test|--- |ok|FAIL|panic)' || true
