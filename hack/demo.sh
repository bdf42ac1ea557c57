#!/usr/bin/env bash
# make demo: the main job of starling, end to end, in temporary directories.
# Today: build a realistic image (Debian + python3, cached), push it to a
# local registry, convert it to eStargz with starling, and inspect both.
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

say "the image as built: ordinary gzip layers"
starling inspect "$reg/python:3"

say "starling convert $reg/python:3 $reg/python:3-esgz"
echo "usr/bin/python3.11" >"$work/prio"
starling convert --prioritized-files "$work/prio" "$reg/python:3" "$reg/python:3-esgz"

say "the converted image: eStargz layers, TOC digests checked against the manifest"
starling inspect "$reg/python:3-esgz"

say "the first entries of the top layer's table of contents"
starling inspect --toc --layer 2 "$reg/python:3-esgz" | python3 -c '
import json, sys
toc = json.load(sys.stdin)
for e in toc["entries"][:8]:
    print(f"  {e[\"type\"]:8} {e.get(\"size\", 0):>10}  {e[\"name\"]}")
print(f"  ... {len(toc[\"entries\"])} entries")'
