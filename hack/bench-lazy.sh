#!/usr/bin/env bash
# make bench-lazy: cold start of a python image (pull + python3 -V) from a
# registry behind an emulated 100 Mbit/s link with 10 ms per request; a full
# pull on containerd's overlayfs against starling's lazy pull, and the warm
# start of both; then the filesystem's own ratios (bench-fs: a cold 4 KiB
# read, cached large and small files against overlayfs) and the daemon's
# footprint with 100 lazy layers (bench-footprint). RATE=... sets
# the link rate (tc syntax, default 100mbit).
set -euo pipefail
. "$(dirname "$0")/lib/common.sh"
. "$(dirname "$0")/lib/debian-image.sh"
layout=$(debian_image demo-python "ca-certificates" "python3")
cd "$ROOT_DIR"
STARLING_BENCH=1 STARLING_BENCH_LAYOUT="$layout" STARLING_BIN="$BIN" \
	go test -tags bench -count=1 -run '^(TestBenchLazy|TestBenchFS|TestBenchDaemonFootprint)$' -v -timeout 40m ./test/lazy 2>&1 |
	grep -E '^(bench-|  |    (fs)?bench_test|--- |ok|FAIL)' || true
