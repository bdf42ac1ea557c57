# shellcheck shell=bash
# Builds realistic multi-layer Debian images with mmdebstrap and umoci, and
# caches them as OCI layouts under .cache/images, so benchmarks and the demo
# pay for them once.
#
# debian_image NAME "PKGS-OF-LAYER-1" "PKGS-ADDED-BY-LAYER-2" ...
#   prints the path of an OCI layout holding NAME:latest; layer N holds what
#   the packages of layer N add to the tree of layers 1..N-1.

STARLING_CACHE=${STARLING_CACHE:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/.cache}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
DEBIAN_SUITE=${DEBIAN_SUITE:-bookworm}

debian_image() {
	local name=$1
	shift
	local layout="$STARLING_CACHE/images/$name"
	if [ -f "$layout/.complete" ]; then
		echo "$layout"
		return 0
	fi
	local work
	work=$(mktemp -d "${TMPDIR:-/tmp}/starling-img.XXXXXX")
	rm -rf "$layout"
	mkdir -p "$(dirname "$layout")"
	umoci init --layout "$layout" >&2
	umoci new --image "$layout:latest" >&2
	local pkgs="" layer
	for layer in "$@"; do
		pkgs="$pkgs${pkgs:+,}$(echo "$layer" | tr ' ' ',')"
		echo "debian_image $name: mmdebstrap --variant=minbase --include=$pkgs" >&2
		rm -rf "$work/root"
		mmdebstrap --quiet --variant=minbase --include="$pkgs" \
			--dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
			--dpkgopt='path-exclude=/usr/share/locale/*' \
			--customize-hook='rm -rf "$1"/var/cache/apt/* "$1"/var/lib/apt/lists/* "$1"/var/log/*' \
			"$DEBIAN_SUITE" "$work/root" "$DEBIAN_MIRROR" >&2
		# umoci records what changed against the tree it unpacked: unpack
		# the image so far, put the new tree in its place, repack.
		rm -rf "$work/bundle"
		umoci unpack --image "$layout:latest" "$work/bundle" >&2
		rm -rf "$work/bundle/rootfs"
		cp -a "$work/root" "$work/bundle/rootfs"
		umoci repack --image "$layout:latest" "$work/bundle" >&2
	done
	umoci config --image "$layout:latest" --config.cmd /bin/sh --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin >&2
	umoci gc --layout "$layout" >&2
	rm -rf "$work"
	touch "$layout/.complete"
	echo "$layout"
}
