#!/usr/bin/env bash
# make bench-convert: converts the same multi-layer Debian image (a few
# hundred MB, built once with mmdebstrap and cached in .cache/images) to
# eStargz with `starling convert` and with the reference converter
# (`ctr-remote image convert --estargz --oci`), and prints both throughputs
# and their ratio. Both convert from local storage to local storage: starling
# from and to OCI layouts, ctr-remote inside containerd's content store.
# starling is also timed registry to registry, the way it is used.
set -euo pipefail
. "$(dirname "$0")/lib/common.sh"
. "$(dirname "$0")/lib/debian-image.sh"

layout=$(debian_image bench-convert "ca-certificates" "python3" "build-essential" "git curl perl")
work=$(mktemp -d /tmp/starling-bench-convert.XXXXXX)
on_exit "rm -rf $work"

port=$(free_port)
reg=127.0.0.1:$port
start_registry "$work/registry" "$reg"
skopeo copy --quiet --dest-tls-verify=false "oci:$layout:latest" "docker://$reg/bench:gz"

insize=$(starling inspect -o json "$reg/bench:gz" | python3 -c 'import json,sys; print(sum(l["size"] for l in json.load(sys.stdin)["layers"]))')
nlayers=$(starling inspect -o json "$reg/bench:gz" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["layers"]))')
echo "image: $nlayers layers, $((insize / 1048576)) MiB compressed"

now() { date +%s.%N; }
secs() { python3 -c "print(f'{$2 - $1:.2f}')"; }

# starling, layout to layout (the like-for-like comparison).
t0=$(now)
starling convert "oci:$layout:latest" "oci:$work/out:esgz" >/dev/null
t1=$(now)
s_local=$(secs "$t0" "$t1")

# starling, registry to registry.
t0=$(now)
starling convert "$reg/bench:gz" "$reg/bench:esgz" >/dev/null
t1=$(now)
s_reg=$(secs "$t0" "$t1")

# ctr-remote, inside containerd's content store.
start_containerd "$work/containerd"
ctr-remote --address "$CTD_SOCK" image pull --plain-http "$reg/bench:gz" >/dev/null
t0=$(now)
ctr-remote --address "$CTD_SOCK" image convert --estargz --oci "$reg/bench:gz" "$reg/bench:ctr" >/dev/null
t1=$(now)
s_ctr=$(secs "$t0" "$t1")

python3 - "$insize" "$s_local" "$s_reg" "$s_ctr" <<'PY'
import sys
size, local, reg, ctr = int(sys.argv[1]), *map(float, sys.argv[2:])
mb = size / 1e6
print(f"starling convert (OCI layout -> OCI layout): {local:7.2f} s  {mb/local:7.1f} MB/s")
print(f"starling convert (registry -> registry):     {reg:7.2f} s  {mb/reg:7.1f} MB/s")
print(f"ctr-remote image convert --estargz --oci:    {ctr:7.2f} s  {mb/ctr:7.1f} MB/s")
print(f"ratio starling/ctr-remote throughput: {ctr/local:.2f}x (local), {ctr/reg:.2f}x (registry to registry)")
PY
