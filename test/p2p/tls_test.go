package p2p_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/starling-dev/starling/internal/testenv"
)

// Issue 11: the cluster with mutual TLS. A CA made by the real CLI
// (`starling cluster init`), a certificate per host from `starling cluster
// issue` (with the host's IP; the seed's and the scheduler's marked as
// such), and every daemon started with its own. Without it (c.tls nil) the
// daemons run in plaintext, which they accept off loopback only when told
// `insecure`.

// clusterTLS is the cluster's CA on disk and the CLI that made it.
type clusterTLS struct {
	t   *testing.T
	cli string
	dir string // the CA: everything `starling cluster init` wrote
}

// certKind is what a certificate is issued for.
type certKind string

const (
	certPeer      certKind = "peer"
	certSeed      certKind = "seed"
	certScheduler certKind = "scheduler"
)

// nodeCert is one host's identity: the cluster CA, its certificate and key.
type nodeCert struct {
	ca, cert, key string
}

// newClusterTLS makes a cluster CA with `starling cluster init`.
func newClusterTLS(t *testing.T) *clusterTLS {
	t.Helper()
	ct := &clusterTLS{t: t, cli: testenv.Bin(t, "starling"), dir: filepath.Join(t.TempDir(), "ca")}
	testenv.Run(t, ct.cli, cliInit(ct.dir)...)
	return ct
}

// issue makes a certificate for a host (name, ip) with `starling cluster
// issue`, in a directory of its own.
func (ct *clusterTLS) issue(name, ip string, kind certKind) nodeCert {
	ct.t.Helper()
	out := filepath.Join(ct.dir, "issued", name)
	if err := os.MkdirAll(out, 0o700); err != nil {
		ct.t.Fatal(err)
	}
	args, nc := cliIssue(ct.dir, out, name, ip, kind)
	testenv.Run(ct.t, ct.cli, args...)
	for _, f := range []string{nc.ca, nc.cert, nc.key} {
		if _, err := os.Stat(f); err != nil {
			ct.t.Fatalf("starling %s: %v", strings.Join(args, " "), err)
		}
	}
	return nc
}

// ---- The CLI and flags of the cluster identity (docs/security.md): all
// that depends on their spelling is in the three functions below. ----

// cliInit is the argument list of `starling cluster init` writing the CA
// to dir.
func cliInit(dir string) []string {
	return []string{"cluster", "init", "--dir", dir}
}

// cliIssue is the argument list of `starling cluster issue` for a host and
// where the files it writes end up.
func cliIssue(caDir, out, name, ip string, kind certKind) ([]string, nodeCert) {
	args := []string{"cluster", "issue", name, "--dir", caDir, "--out", out, "--ip", ip}
	switch kind {
	case certSeed:
		args = append(args, "--seed")
	case certScheduler:
		args = append(args, "--scheduler")
	}
	return args, nodeCert{
		ca:   filepath.Join(caDir, "ca.crt"),
		cert: filepath.Join(out, name+".crt"),
		key:  filepath.Join(out, name+".key"),
	}
}

// flags is how a daemon (starlingd or starling-scheduler) is given the
// identity.
func (nc nodeCert) flags() []string {
	return []string{"--cluster-ca", nc.ca, "--cluster-cert", nc.cert, "--cluster-key", nc.key}
}

// ---- end of the interface-specific part ----

// securityFlags is what a daemon of the cluster is started with: its
// certificate with mTLS on; else --insecure, since its listeners are on the
// host's address, not loopback, and a daemon refuses plaintext there
// without it.
func (c *cluster) securityFlags(nc *nodeCert) []string {
	if c.tls == nil {
		return []string{"--insecure"}
	}
	return nc.flags()
}
