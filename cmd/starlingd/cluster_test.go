package main

import (
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/starling-dev/starling/internal/testenv"
	"github.com/starling-dev/starling/pkg/cluster"
	"github.com/starling-dev/starling/pkg/config"
)

func TestClusterFlags(t *testing.T) {
	cfgPath := writeFile(t, "[cluster]\nca = \"/pki/ca.crt\"\ncert = \"/pki/n.crt\"\nkey = \"/pki/n.key\"\n")
	cfg, err := parse(t, "--config", cfgPath, "--cluster-cert", "/other/n.crt", "--insecure")
	if err != nil {
		t.Fatal(err)
	}
	if want := (config.Cluster{CA: "/pki/ca.crt", Cert: "/other/n.crt", Key: "/pki/n.key", Insecure: true}); cfg.Cluster != want {
		t.Fatalf("cluster %+v, want %+v", cfg.Cluster, want)
	}
}

// Plaintext on an upload listener other hosts reach needs insecure.
func TestDaemonRefusesOpenPlaintext(t *testing.T) {
	base := []string{"--snapshotter=false", "--peer", "--proxy-listen", "", "--metrics-listen", "", "--health-listen", ""}
	stop := startDaemon(t, append(base, "--upload-listen", ":0")...)
	if err := stop(); err == nil || !strings.Contains(err.Error(), "insecure") {
		t.Fatalf("plaintext upload on every interface: %v", err)
	}
	stop = startDaemon(t, append(base, "--upload-listen", ":0", "--insecure")...)
	time.Sleep(200 * time.Millisecond)
	if err := stop(); err != nil {
		t.Fatalf("--insecure: %v", err)
	}
}

// With [cluster], the peer announces over TLS under its certificate's CN.
func TestDaemonJoinsOverMutualTLS(t *testing.T) {
	dir := t.TempDir()
	if _, _, err := cluster.Init(dir); err != nil {
		t.Fatal(err)
	}
	issue := func(name string, roles ...string) cluster.Issued {
		is, err := cluster.Issue(dir, name, cluster.IssueOptions{Roles: roles, IPs: []net.IP{net.ParseIP("127.0.0.1")}})
		if err != nil {
			t.Fatal(err)
		}
		return is
	}
	si := issue("sched", cluster.RoleScheduler)
	sc, err := cluster.Load(config.Cluster{CA: si.CA, Cert: si.Cert, Key: si.Key})
	if err != nil {
		t.Fatal(err)
	}
	schedAddr, srv := testenv.StartTLSScheduler(t, sc)

	ni := issue("node1", cluster.RolePeer, cluster.RoleSeed)
	cfgPath := filepath.Join(t.TempDir(), "starlingd.toml")
	os.WriteFile(cfgPath, []byte("[cluster]\nca = \""+ni.CA+"\"\ncert = \""+ni.Cert+"\"\nkey = \""+ni.Key+"\"\n"), 0o644)
	base := []string{"--snapshotter=false", "--peer", "--proxy-listen", "", "--metrics-listen", "", "--health-listen", "",
		"--advertise-ip", "127.0.0.1", "--upload-listen", ":0", "--scheduler", schedAddr, "--cluster-ca", ni.CA,
		"--cluster-cert", ni.Cert, "--cluster-key", ni.Key}
	stop := startDaemon(t, append(base, "--role", "seed")...)
	testenv.WaitFor(t, 20*time.Second, "the seed to join over TLS", func() bool {
		_, seeds, _ := srv.Scheduler().Stats()
		return seeds == 1
	})
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	// A seed needs the seed role in its certificate.
	pi := issue("node2")
	base = append(base[:len(base)-6], "--cluster-ca", pi.CA, "--cluster-cert", pi.Cert, "--cluster-key", pi.Key, "--role", "seed")
	stop = startDaemon(t, base...)
	if err := stop(); err == nil || !strings.Contains(err.Error(), "no seed") {
		t.Fatalf("a peer certificate for a seed: %v", err)
	}
}
