package proxy

import (
	"fmt"
	"net"
	"strings"

	"github.com/starling-dev/starling/pkg/registry"
)

// DefaultHosts is the hosts directory name containerd 1.7 and newer read
// for every registry that has no directory of its own.
const DefaultHosts = "_default"

// MirrorURL is the URL containerd reaches a proxy listening on listen at:
// an unspecified host (":4001", "0.0.0.0:4001") is reached on loopback.
func MirrorURL(listen string) (string, error) {
	if strings.Contains(listen, "://") {
		return strings.TrimSuffix(listen, "/"), nil
	}
	host, port, err := net.SplitHostPort(listen)
	if err != nil {
		return "", fmt.Errorf("mirror address %q: %w", listen, err)
	}
	if ip := net.ParseIP(host); host == "" || (ip != nil && ip.IsUnspecified()) {
		host = "127.0.0.1"
	}
	return "http://" + net.JoinHostPort(host, port), nil
}

// RegistryServer is the URL containerd should reach registry host at when
// the mirror fails: docker.io's API lives at registry-1.docker.io, and
// scheme (FromConfig's: http for insecure and loopback registries) says
// which hosts speak plain HTTP. It is "" for DefaultHosts, so that
// containerd falls back to each image's own registry.
func RegistryServer(host string, scheme func(string) string) string {
	switch host {
	case DefaultHosts:
		return ""
	case "docker.io":
		return "https://" + dockerHub
	}
	if scheme == nil {
		scheme = func(host string) string { return registry.Config{}.Endpoint(host).Scheme() }
	}
	return scheme(host) + "://" + host
}

// HostsTOML is containerd's hosts.toml for registry host (or DefaultHosts)
// that makes pulls go through the mirror at mirrorURL first. Pushes are
// not sent to the mirror (capabilities), and when the mirror fails
// containerd goes to the registry itself.
func HostsTOML(host, mirrorURL string, scheme func(string) string) []byte {
	var b strings.Builder
	b.WriteString("# Written by `starling setup containerd --mirror`: pulls go through\n")
	b.WriteString("# starling's P2P registry mirror first, then to the registry itself.\n")
	if srv := RegistryServer(host, scheme); srv != "" {
		fmt.Fprintf(&b, "server = %q\n", srv)
	} else {
		b.WriteString("# No server line: when the mirror fails, containerd goes to the image's\n")
		b.WriteString("# own registry. containerd 1.7 and newer read _default for every registry\n")
		b.WriteString("# without a directory of its own; 1.6 does not.\n")
	}
	fmt.Fprintf(&b, "\n[host.%q]\n  capabilities = [\"pull\", \"resolve\"]\n", mirrorURL)
	return []byte(b.String())
}
