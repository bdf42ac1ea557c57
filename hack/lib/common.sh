# shellcheck shell=bash
# Shared by the demo and benchmarks: start a registry in a temporary
# directory, stop everything on exit.

ROOT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BIN=${BIN:-$ROOT_DIR/bin}
export PATH="$BIN:$PATH"

CLEANUP=()
cleanup() {
	local i
	for ((i = ${#CLEANUP[@]} - 1; i >= 0; i--)); do
		eval "${CLEANUP[$i]}" >/dev/null 2>&1 || true
	done
}
trap cleanup EXIT
on_exit() { CLEANUP+=("$*"); }

free_port() {
	python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

wait_tcp() { # host port [seconds]
	local i
	for ((i = 0; i < ${3:-30} * 10; i++)); do
		if (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; then return 0; fi
		sleep 0.1
	done
	echo "nothing listens on $1:$2" >&2
	return 1
}

# start_registry DIR ADDR: Debian's docker-registry serving from DIR.
start_registry() {
	local dir=$1 addr=$2
	mkdir -p "$dir"
	cat >"$dir/config.yml" <<EOC
version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $dir/data
http:
  addr: $addr
EOC
	docker-registry serve "$dir/config.yml" >"$dir/log" 2>&1 &
	on_exit "kill $!"
	wait_tcp "${addr%:*}" "${addr##*:}"
}

# start_containerd DIR [EXTRA-CONFIG]: containerd with its own root; sets CTD_SOCK.
start_containerd() {
	local dir=$1 extra=${2:-}
	mkdir -p "$dir"
	CTD_SOCK=$dir/containerd.sock
	cat >"$dir/config.toml" <<EOC
version = 2
root = "$dir/root"
state = "$dir/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$CTD_SOCK"
[ttrpc]
  address = "$CTD_SOCK.ttrpc"
$extra
EOC
	containerd --config "$dir/config.toml" >"$dir/log" 2>&1 &
	local pid=$!
	on_exit "ctr --address $CTD_SOCK task ls -q | xargs -r -n1 ctr --address $CTD_SOCK task kill -s SIGKILL; sleep 0.5; kill $pid; sleep 1; grep -o \" $dir[^ ]*\" /proc/self/mounts | sort -r | xargs -r -n1 umount -l"
	local i
	for ((i = 0; i < 300; i++)); do
		ctr --address "$CTD_SOCK" version >/dev/null 2>&1 && return 0
		sleep 0.1
	done
	echo "containerd did not start; see $dir/log" >&2
	return 1
}
