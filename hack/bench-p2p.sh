#!/usr/bin/env bash
# make bench-p2p: N peers (and a seed) fetch one blob at once, every host a
# network namespace behind a link limited with tbf both ways, the registry
# behind a slower one (the origin link). Prints, in one run: the baseline
# (one plain GET over the origin link), the last peer's time over it
# (last_peer_ratio, target <= 1.3), the bytes the registry served over the
# blob's size (origin_ratio, target <= 1.05), the same with one peer
# SIGKILLed mid-transfer and the scheduler SIGKILLed and restarted
# (fault_origin_ratio, target <= 1.10), and the CPU seconds of every daemon.
# Needs root (network namespaces); takes a few minutes.
#   STARLING_BENCH_PEERS      number of peers fetching at once (default 8)
#   STARLING_BENCH_RATE       the registry's link, tc syntax (default 100mbit)
#   STARLING_BENCH_PEER_RATE  every other host's link (default 1gbit)
#   STARLING_BENCH_SIZE       blob size in MiB, or with M/MiB/G/GiB (default 256)
set -euo pipefail
. "$(dirname "$0")/lib/common.sh"
cd "$ROOT_DIR"
# Run alone (not from make), it still gets what make's deps and build give;
# both do nothing when everything is in place.
"$ROOT_DIR/hack/install-deps.sh"
make -s build >/dev/null
out=$(mktemp /tmp/starling-bench-p2p.XXXXXX)
on_exit "rm -f $out"
set +e
STARLING_BENCH=1 STARLING_BIN="$BIN" \
	STARLING_BENCH_PEERS=${STARLING_BENCH_PEERS:-8} \
	STARLING_BENCH_RATE=${STARLING_BENCH_RATE:-100mbit} \
	STARLING_BENCH_PEER_RATE=${STARLING_BENCH_PEER_RATE:-1gbit} \
	STARLING_BENCH_SIZE=${STARLING_BENCH_SIZE:-256} \
	go test -tags bench -count=1 -run '^TestBenchP2P$' -v -timeout 30m ./test/p2p 2>&1 | tee "$out" |
	grep --line-buffered -E '^(bench-p2p|  [A-Za-z]|    [A-Za-z]|origin_ratio=|targets:|PASS |MISS |--- |ok|FAIL|panic)'
rc=${PIPESTATUS[0]}
set -e
if [ "$rc" != 0 ]; then
	echo "bench-p2p: the benchmark failed (go test exit $rc); last lines of its output:" >&2
	tail -n 60 "$out" >&2
fi
exit "$rc"
