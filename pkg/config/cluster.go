package config

import (
	"fmt"
	"net"
	"strings"
)

// Cluster names this node's cluster identity: the CA every member's
// certificate chains to, and this node's own certificate and key. The same
// section configures starlingd and starling-scheduler; `starling cluster
// init` and `starling cluster issue` make the files.
type Cluster struct {
	// CA is the cluster CA certificate (PEM). Empty: no TLS at all.
	CA string `toml:"ca"`
	// Cert and Key are this node's certificate and private key (PEM).
	Cert string `toml:"cert"`
	Key  string `toml:"key"`
	// Insecure allows plaintext on listeners that are not loopback. Without
	// it a node without CA refuses to start unless it only listens on
	// loopback, because anyone who reaches a plaintext port is a member.
	Insecure bool `toml:"insecure"`
}

// TLS reports whether cluster TLS is configured.
func (c Cluster) TLS() bool { return c.CA != "" }

// Validate reports a half-configured identity.
func (c Cluster) Validate() error {
	if c.CA == "" {
		if c.Cert != "" || c.Key != "" {
			return fmt.Errorf("cluster: cert and key given without ca")
		}
		return nil
	}
	if c.Cert == "" || c.Key == "" {
		return fmt.Errorf("cluster: ca %s given without cert and key", c.CA)
	}
	return nil
}

// CheckPlaintext refuses to run without TLS when any of listeners (HOST:PORT,
// empty ones ignored) is reachable from another host, unless Insecure is set.
// A listener without a host (":4000") listens on every interface.
func (c Cluster) CheckPlaintext(listeners ...string) error {
	if c.TLS() || c.Insecure {
		return nil
	}
	var open []string
	for _, l := range listeners {
		if l != "" && !loopback(l) {
			open = append(open, l)
		}
	}
	if len(open) > 0 {
		return fmt.Errorf("cluster: no TLS configured ([cluster] ca) and listening beyond loopback on %s: "+
			"set up a cluster CA (starling cluster init) or set cluster.insecure = true (--insecure)",
			strings.Join(open, ", "))
	}
	return nil
}

func loopback(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		host = addr
	}
	host = strings.Trim(host, "[]")
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}
