// Package cluster is the identity of a starling cluster's members: a cluster
// CA, a certificate per node naming it (CN) and its roles (OU), and the TLS
// configurations with which members authenticate each other both ways.
//
// Who is trusted: whatever holds a key whose certificate chains to the
// cluster CA. Roles narrow what a member may do: only "seed" may announce
// as a seed, only "scheduler" may serve the scheduler API to peers, and a
// peer's ID is the CN of its certificate, so one certificate is one peer.
package cluster

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"slices"
	"strings"

	"github.com/starling-dev/starling/pkg/config"
)

// Roles a certificate can carry in its OU.
const (
	RolePeer      = "peer"      // announces, takes pieces, serves pieces
	RoleSeed      = "seed"      // may announce as a seed and take work
	RoleScheduler = "scheduler" // serves the scheduler API
	RoleClient    = "client"    // the command line: preheat, task status
)

// Cluster is a loaded cluster identity. A nil *Cluster means no TLS; its
// methods then say so (Enabled false, nil configurations).
type Cluster struct {
	cfg   config.Cluster
	pool  *x509.CertPool
	cert  tls.Certificate
	ident Identity
}

// Load reads the CA and this node's certificate and key. A configuration
// without CA gives (nil, nil): plaintext, which CheckPlaintext polices.
func Load(c config.Cluster) (*Cluster, error) {
	if err := c.Validate(); err != nil {
		return nil, err
	}
	if !c.TLS() {
		return nil, nil
	}
	caPEM, err := os.ReadFile(c.CA)
	if err != nil {
		return nil, fmt.Errorf("cluster CA: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, fmt.Errorf("cluster CA %s: no PEM certificate", c.CA)
	}
	cert, err := tls.LoadX509KeyPair(c.Cert, c.Key)
	if err != nil {
		return nil, fmt.Errorf("cluster certificate %s, key %s: %w", c.Cert, c.Key, err)
	}
	leaf := cert.Leaf
	if leaf == nil {
		if leaf, err = x509.ParseCertificate(cert.Certificate[0]); err != nil {
			return nil, fmt.Errorf("cluster certificate %s: %w", c.Cert, err)
		}
		cert.Leaf = leaf
	}
	// A certificate from another CA would fail every handshake later with
	// a message on the other side; say so here, at start.
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: pool, Intermediates: intermediates(cert.Certificate[1:]),
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		return nil, fmt.Errorf("cluster certificate %s does not chain to the CA %s: %w", c.Cert, c.CA, err)
	}
	return &Cluster{cfg: c, pool: pool, cert: cert, ident: identityOf(leaf)}, nil
}

// Enabled reports whether TLS is on.
func (c *Cluster) Enabled() bool { return c != nil }

// Identity is this node's own name and roles.
func (c *Cluster) Identity() Identity {
	if c == nil {
		return Identity{}
	}
	return c.ident
}

// CheckPlaintext returns nil with TLS on; without, it refuses listeners
// beyond loopback unless the configuration says insecure (see
// config.Cluster.CheckPlaintext). The caller logs the plaintext warning.
func CheckPlaintext(c config.Cluster, listeners ...string) error {
	return c.CheckPlaintext(listeners...)
}

// ServerTLS is the configuration of a listener only members may use: a
// client certificate chaining to the CA is required (TLS 1.3).
func (c *Cluster) ServerTLS() *tls.Config {
	if c == nil {
		return nil
	}
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{c.cert},
		ClientCAs:    c.pool,
		ClientAuth:   tls.RequireAndVerifyClientCert,
	}
}

// ServerTLSOptionalClient is ServerTLS for a listener that also serves
// some paths to anyone (health, metrics): a client certificate is verified
// when given, and RequireMember guards the paths that need one.
func (c *Cluster) ServerTLSOptionalClient() *tls.Config {
	cfg := c.ServerTLS()
	if cfg != nil {
		cfg.ClientAuth = tls.VerifyClientCertIfGiven
	}
	return cfg
}

// ClientTLS is the configuration for dialling a member: it presents this
// node's certificate and accepts a server whose certificate chains to the
// CA and carries one of serverRoles (none: any role). The server's name is
// checked against its certificate's IP and DNS SANs by DialTLS and
// Credentials, which know the address dialled (a bare tls.Config does not
// for IP addresses); a certificate without SANs passes on chain and role.
func (c *Cluster) ClientTLS(serverRoles ...string) *tls.Config {
	if c == nil {
		return nil
	}
	roles := slices.Clone(serverRoles)
	pool := c.pool
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{c.cert},
		// Peers reconnect to the same parents all the time; resumption
		// spares them a full handshake each time.
		ClientSessionCache: tls.NewLRUClientSessionCache(256),
		// Chain and role are checked in VerifyConnection instead: Go's
		// own check insists on a SAN matching the dialled name, which a
		// node certificate issued without --ip does not have.
		InsecureSkipVerify: true, //nolint:gosec // verified below
		VerifyConnection: func(cs tls.ConnectionState) error {
			_, err := verifyServer(cs, pool, roles)
			return err
		},
	}
}

// verifyServer checks a server's chain and roles.
func verifyServer(cs tls.ConnectionState, pool *x509.CertPool, roles []string) (*x509.Certificate, error) {
	if len(cs.PeerCertificates) == 0 {
		return nil, errors.New("cluster: server presented no certificate")
	}
	leaf := cs.PeerCertificates[0]
	var rest [][]byte
	for _, c := range cs.PeerCertificates[1:] {
		rest = append(rest, c.Raw)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: pool, Intermediates: intermediates(rest),
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}); err != nil {
		return nil, fmt.Errorf("cluster: server certificate %q: %w", leaf.Subject.CommonName, err)
	}
	id := identityOf(leaf)
	if len(roles) > 0 && !slices.ContainsFunc(roles, id.Has) {
		return nil, fmt.Errorf("cluster: server %q has roles %v, want one of %v", id.Name, id.Roles, roles)
	}
	return leaf, nil
}

// VerifyHost checks a verified server certificate against the host
// dialled, when the certificate names any: an IP or DNS SAN must match.
func VerifyHost(cs tls.ConnectionState, host string) error {
	if len(cs.PeerCertificates) == 0 {
		return errors.New("cluster: server presented no certificate")
	}
	leaf := cs.PeerCertificates[0]
	if len(leaf.IPAddresses) == 0 && len(leaf.DNSNames) == 0 {
		return nil
	}
	host = strings.Trim(host, "[]")
	if err := leaf.VerifyHostname(host); err != nil {
		return fmt.Errorf("cluster: server %q dialled as %s: %w", leaf.Subject.CommonName, host, err)
	}
	return nil
}

func intermediates(ders [][]byte) *x509.CertPool {
	if len(ders) == 0 {
		return nil
	}
	p := x509.NewCertPool()
	for _, d := range ders {
		if c, err := x509.ParseCertificate(d); err == nil {
			p.AddCert(c)
		}
	}
	return p
}

// hostOf is the host part of HOST:PORT (or the whole when there is no port).
func hostOf(addr string) string {
	if h, _, err := net.SplitHostPort(addr); err == nil {
		return h
	}
	return addr
}
