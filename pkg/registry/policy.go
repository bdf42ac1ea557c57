package registry

import (
	"crypto/tls"
	"net"
	"net/http"
	"strings"
)

// Endpoint says how one host is reached. Config.Endpoint is the one place
// that decides it, for go-containerregistry's requests (Client), for
// containerd's resolver (starling pull), for the proxy's upstreams and for
// the hosts.toml files of starling setup alike, so that the same host is
// never reached one way by one command and another way by the next.
type Endpoint struct {
	// Host is host[:port] as written in references.
	Host string
	// PlainHTTP reaches the host over http instead of https.
	PlainHTTP bool
	// SkipVerify accepts any TLS certificate from the host.
	SkipVerify bool
	// Header is added to every request sent to the host.
	Header http.Header
}

// Scheme is "http" or "https".
func (e Endpoint) Scheme() string {
	if e.PlainHTTP {
		return "http"
	}
	return "https"
}

// TLSConfig is the TLS client configuration of the host's connections.
func (e Endpoint) TLSConfig() *tls.Config {
	return &tls.Config{InsecureSkipVerify: e.SkipVerify} //nolint:gosec // only for hosts configured skip_verify
}

// HostPolicy is a registry and the mirrors its reads try first, in order.
type HostPolicy struct {
	Origin  Endpoint
	Mirrors []Endpoint
}

// HostPolicy returns how registry host and its mirrors are reached.
func (c Config) HostPolicy(host string) HostPolicy {
	hp := HostPolicy{Origin: c.Endpoint(host)}
	hc, _ := c.hostConfig(host)
	for _, m := range hc.Mirrors {
		e := c.Endpoint(m.Host)
		e.Header = m.Header
		hp.Mirrors = append(hp.Mirrors, e)
	}
	return hp
}

// Endpoint returns how any host is reached, a registry or a mirror of one.
// A host named several times (as a registry and as a mirror of another)
// gets the union of what the entries allow, so it is reached one way only.
// Plain HTTP is used for loopback hosts (as Docker, containerd and
// stargz-snapshotter do), hosts marked insecure, and every host when
// c.PlainHTTP is set. Header is the host's own, not a mirror entry's.
func (c Config) Endpoint(host string) Endpoint {
	e := Endpoint{Host: host, PlainHTTP: c.PlainHTTP || isLoopback(host)}
	if hc, ok := c.hostConfig(host); ok {
		e.PlainHTTP = e.PlainHTTP || hc.Insecure
		e.SkipVerify = hc.SkipVerify
		e.Header = hc.Header
	}
	for _, hc := range c.Host {
		for _, m := range hc.Mirrors {
			if m.Host == host {
				e.PlainHTTP = e.PlainHTTP || m.Insecure
				e.SkipVerify = e.SkipVerify || m.SkipVerify
			}
		}
	}
	return e
}

// dockerHub is what Docker Hub is called: users configure "docker.io",
// go-containerregistry names it index.docker.io and containerd reaches it
// at registry-1.docker.io.
var dockerHub = []string{"docker.io", "index.docker.io", "registry-1.docker.io"}

// hostConfig finds host's entry, taking Docker Hub's names as one.
func (c Config) hostConfig(host string) (HostConfig, bool) {
	if hc, ok := c.Host[host]; ok {
		return hc, true
	}
	for _, h := range dockerHub {
		if h == host {
			for _, alias := range dockerHub {
				if hc, ok := c.Host[alias]; ok {
					return hc, true
				}
			}
		}
	}
	return HostConfig{}, false
}

func hostOnly(hostport string) string {
	if h, _, err := net.SplitHostPort(hostport); err == nil {
		return h
	}
	return hostport
}

// isLoopback reports whether a registry host is on this machine.
func isLoopback(hostport string) bool {
	h := hostOnly(hostport)
	if h == "localhost" {
		return true
	}
	ip := net.ParseIP(strings.Trim(h, "[]"))
	return ip != nil && ip.IsLoopback()
}
