#!/usr/bin/env bash
# Installs the system parts starling's tests, demo and benchmarks run against,
# only when they are missing, so a warm machine pays nothing.
set -euo pipefail
need=()
have() { command -v "$1" >/dev/null 2>&1; }
have containerd        || need+=(containerd)
have runc              || need+=(runc)
have docker-registry   || need+=(docker-registry)
have fusermount3       || need+=(fuse3)
have skopeo            || need+=(skopeo)
have umoci             || need+=(umoci)
[ -x /bin/busybox ]    || need+=(busybox-static)
have mmdebstrap        || need+=(mmdebstrap)
have ctr-remote        || need+=(stargz-snapshotter)
have ip                || need+=(iproute2)
have tc                || need+=(iproute2)
have curl              || need+=(curl)
if [ ${#need[@]} -gt 0 ]; then
	if [ "$(id -u)" != 0 ]; then
		echo "install-deps: missing ${need[*]}; run as root or install them" >&2
		exit 1
	fi
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
	echo "install-deps: installed ${need[*]}"
fi
# Debian's docker-registry and containerd packages may start system services
# on install; the tests start their own in temporary directories.
modprobe fuse 2>/dev/null || true
modprobe overlay 2>/dev/null || true
