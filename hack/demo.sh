#!/usr/bin/env bash
# make demo: starling's main job, end to end, in temporary directories.
# Builds a realistic image (Debian bookworm + python3, cached), pushes it to
# a local registry, converts it to eStargz, pulls it into containerd through
# the starling snapshotter on two nodes that share a P2P network (a
# scheduler and a seed peer), runs `python3 -V` on each while the image is
# still in the registry, and prints who fetched what from where.
set -euo pipefail
. "$(dirname "$0")/lib/common.sh"
. "$(dirname "$0")/lib/debian-image.sh"

say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

say "building Debian bookworm + python3 with mmdebstrap (cached in .cache/images)"
layout=$(debian_image demo-python "ca-certificates" "python3")

work=$(mktemp -d /tmp/starling-demo.XXXXXX)
on_exit "rm -rf $work"
reg=127.0.0.1:$(free_port)
say "starting a registry at $reg"
start_registry "$work/registry" "$reg"
skopeo copy --quiet --dest-tls-verify=false "oci:$layout:latest" "docker://$reg/python:3"
starling inspect "$reg/python:3"

say "starling convert $reg/python:3 $reg/python:3-esgz"
starling convert "$reg/python:3" "$reg/python:3-esgz"
starling inspect "$reg/python:3-esgz"

say "starting starling-scheduler, a seed peer and two nodes (starlingd + containerd each)"
sched=127.0.0.1:$(free_port)
starling-scheduler --listen "$sched" --http 127.0.0.1:$(free_port) >"$work/scheduler.log" 2>&1 &
on_exit "kill $!"
wait_tcp "${sched%:*}" "${sched##*:}"
cat >"$work/starlingd.toml" <<EOC
# Background fetch is off so that the counts below are what the containers read.
[fs]
background_fetch = false
EOC
seed_metrics=127.0.0.1:$(free_port)
starlingd --config "$work/starlingd.toml" --root "$work/seed" --snapshotter=false --role seed \
	--scheduler "$sched" --advertise-ip 127.0.0.1 --upload-listen 127.0.0.1:$(free_port) \
	--proxy-listen 127.0.0.1:$(free_port) --metrics-listen "$seed_metrics" --health-listen "" >"$work/seed.log" 2>&1 &
on_exit "kill $!; sleep 1"
# start_node N: starlingd (snapshotter and peer) and a containerd using it.
start_node() {
	local n=$1 dir=$work/node$1
	mkdir -p "$dir"
	local m=127.0.0.1:$(free_port)
	starlingd --config "$work/starlingd.toml" --root "$dir/starlingd" --address "$dir/starlingd.sock" \
		--scheduler "$sched" --advertise-ip 127.0.0.1 --upload-listen 127.0.0.1:$(free_port) \
		--proxy-listen 127.0.0.1:$(free_port) --metrics-listen "$m" --health-listen "" >"$dir/starlingd.log" 2>&1 &
	on_exit "kill $!; sleep 1"
	for _ in $(seq 100); do [ -S "$dir/starlingd.sock" ] && break; sleep 0.1; done
	start_containerd "$dir/containerd" "[proxy_plugins.starling]
  type = \"snapshot\"
  address = \"$dir/starlingd.sock\""
	eval "NODE${n}_SOCK=$CTD_SOCK NODE${n}_METRICS=$m"
}
start_node 1
start_node 2

run_on() { # N: lazy pull and run on node N
	local sock_var=NODE$1_SOCK
	local sock=${!sock_var}
	say "node $1: starling pull $reg/python:3-esgz (lazy) and ctr run ... python3 -V"
	local t0 t1
	t0=$(date +%s.%N)
	starling pull --address "$sock" "$reg/python:3-esgz"
	ctr --address "$sock" run --rm --snapshotter starling "$reg/python:3-esgz" demo$1 python3 -V
	t1=$(date +%s.%N)
	echo "node $1: pull + run took $(python3 -c "print(f'{$t1 - $t0:.2f}')") s"
}
run_on 1
run_on 2

metric() { # ADDR NAME [LABEL]: sum of a metric's samples
	curl -s "http://$1/metrics" | awk -v n="$2" -v l="${3:-}" '$1 ~ "^"n && index($1, l) {s += $2} END {printf "%d", s}'
}
size=$(starling inspect -o json "$reg/python:3-esgz" | python3 -c 'import json,sys; print(sum(l["size"] for l in json.load(sys.stdin)["layers"]))')
say "result: who fetched what (image: $((size / 1000000)) MB of layers)"
total_origin=0
for who in seed node1 node2; do
	case $who in
	seed) m=$seed_metrics ;;
	node1) m=$NODE1_METRICS ;;
	node2) m=$NODE2_METRICS ;;
	esac
	read_b=$(metric "$m" starling_fetched_bytes_total)
	# Lazy layers' bytes by source (ranges, footer and TOC), and whole
	# pieces (seed work, whole-blob downloads).
	origin=$(($(metric "$m" starling_layer_bytes_total 'source="origin"') + $(metric "$m" starling_peer_piece_bytes_total 'source="origin"')))
	parent=$(($(metric "$m" starling_layer_bytes_total 'source="peer"') + $(metric "$m" starling_peer_piece_bytes_total 'source="parent"')))
	up=$(metric "$m" starling_peer_upload_bytes_total)
	total_origin=$((total_origin + origin))
	awk -v w="$who" -v r="$read_b" -v o="$origin" -v p="$parent" -v u="$up" 'BEGIN {
		printf "%-6s container reads %6.1f MB | from the registry %6.1f MB, from peers %6.1f MB | served to peers %6.1f MB\n", w, r/1e6, o/1e6, p/1e6, u/1e6 }'
done
awk -v o="$total_origin" -v s="$size" 'BEGIN {
	printf "the registry sent %.1f MB in all for a %.1f MB image and two nodes: %.2f times the image\n", o/1e6, s/1e6, o/s }'
grep -c 'layer mounted lazily' "$work/node1/starlingd.log" | xargs -I{} echo "{} layers mounted lazily on node 1 (see its starlingd log)"
