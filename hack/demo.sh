#!/usr/bin/env bash
# make demo: starling's main job, end to end, in temporary directories.
# Builds a realistic image (Debian bookworm + python3, cached), pushes it to
# a local registry, converts it to eStargz, pulls it into containerd through
# the starling snapshotter and runs `python3 -V` while the image is still in
# the registry, then prints how much of the image was fetched.
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

say "starting starlingd (the snapshotter) and containerd"
metrics=127.0.0.1:$(free_port)
cat >"$work/starlingd.toml" <<EOC
# Background fetch is off so that the count below is what the container read.
[fs]
background_fetch = false
EOC
starlingd --config "$work/starlingd.toml" --root "$work/starlingd" --address "$work/starlingd.sock" \
	--metrics-listen "$metrics" --health-listen "" --peer=false >"$work/starlingd.log" 2>&1 &
on_exit "kill $!; sleep 1"
for _ in $(seq 100); do [ -S "$work/starlingd.sock" ] && break; sleep 0.1; done
start_containerd "$work/containerd" "[proxy_plugins.starling]
  type = \"snapshot\"
  address = \"$work/starlingd.sock\""

say "starling pull $reg/python:3-esgz (lazy: no layer is downloaded)"
t0=$(date +%s.%N)
starling pull --address "$CTD_SOCK" "$reg/python:3-esgz"
say "ctr run --snapshotter starling $reg/python:3-esgz python3 -V"
ctr --address "$CTD_SOCK" run --rm --snapshotter starling "$reg/python:3-esgz" demo python3 -V
t1=$(date +%s.%N)

fetched=$(curl -s "http://$metrics/metrics" | awk '/^starling_fetched_bytes_total/ {printf "%d", $2}')
requests=$(curl -s "http://$metrics/metrics" | awk '/^starling_fetch_requests_total/ {printf "%d", $2}')
size=$(starling inspect -o json "$reg/python:3-esgz" | python3 -c 'import json,sys; print(sum(l["size"] for l in json.load(sys.stdin)["layers"]))')
say "result"
python3 - "$fetched" "$requests" "$size" "$t0" "$t1" <<'PY'
import sys
fetched, requests, size = map(int, sys.argv[1:4])
t0, t1 = map(float, sys.argv[4:6])
print(f"pull + run took {t1 - t0:.2f} s")
print(f"fetched {fetched/1e6:.1f} MB of a {size/1e6:.1f} MB image ({100*fetched/size:.1f} %) in {requests} requests")
PY
grep -c 'layer mounted lazily' "$work/starlingd.log" | xargs -I{} echo "{} layers mounted lazily (see starlingd's log)"
