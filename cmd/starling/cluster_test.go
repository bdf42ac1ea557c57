package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/spf13/cobra"

	"github.com/starling-dev/starling/internal/testenv"
	"github.com/starling-dev/starling/pkg/cluster"
	"github.com/starling-dev/starling/pkg/config"
)

func TestClusterInitIssue(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "pki")
	if _, _, err := runCmd(t, newClusterCmd, "init", "--dir", dir); err != nil {
		t.Fatal(err)
	}
	if _, _, err := runCmd(t, newClusterCmd, "init", "--dir", dir); err == nil || !strings.Contains(err.Error(), "refusing") {
		t.Fatalf("second init: %v", err)
	}
	out := filepath.Join(t.TempDir(), "seed1")
	stdout, _, err := runCmd(t, newClusterCmd, "issue", "seed1", "--dir", dir, "--seed", "--ip", "10.0.0.1", "--ip", "127.0.0.1",
		"--dns", "seed1.lan", "--out", out, "--output", "json")
	if err != nil {
		t.Fatal(err)
	}
	var is cluster.Issued
	if err := json.Unmarshal([]byte(stdout), &is); err != nil {
		t.Fatalf("%v: %s", err, stdout)
	}
	if is.Name != "seed1" || strings.Join(is.Roles, ",") != "peer,seed" || is.Cert != filepath.Join(out, "seed1.crt") || is.CA != filepath.Join(out, "ca.crt") {
		t.Fatalf("issued %+v", is)
	}
	if st, err := os.Stat(is.Key); err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("key %v", err)
	}
	c, err := cluster.Load(config.Cluster{CA: is.CA, Cert: is.Cert, Key: is.Key})
	if err != nil {
		t.Fatal(err)
	}
	if id := c.Identity(); !id.Has(cluster.RoleSeed) || id.Name != "seed1" {
		t.Fatalf("identity %+v", id)
	}
	for args, want := range map[string]string{
		"sched --scheduler": "scheduler", "ops --client": "client", "node1": "peer", "both --scheduler --seed": "peer,scheduler,seed",
	} {
		a := strings.Fields(args)
		stdout, _, err := runCmd(t, newClusterCmd, append([]string{"issue", "--dir", dir, "--output", "json"}, a...)...)
		if err != nil {
			t.Fatalf("%s: %v", args, err)
		}
		var is cluster.Issued
		_ = json.Unmarshal([]byte(stdout), &is)
		if strings.Join(is.Roles, ",") != want {
			t.Errorf("%s: roles %v, want %s", args, is.Roles, want)
		}
	}
	if _, _, err := runCmd(t, newClusterCmd, "issue", "node1", "--dir", dir); err == nil {
		t.Fatal("issued over an existing certificate")
	}
}

// starling preheat shows the cluster certificate of its configuration to
// a scheduler that wants one.
func TestPreheatOverMutualTLS(t *testing.T) {
	dir := t.TempDir()
	if _, _, err := cluster.Init(dir); err != nil {
		t.Fatal(err)
	}
	sched, err := cluster.Issue(dir, "sched", cluster.IssueOptions{Roles: []string{cluster.RoleScheduler}})
	if err != nil {
		t.Fatal(err)
	}
	ops, err := cluster.Issue(dir, "ops", cluster.IssueOptions{Roles: []string{cluster.RoleClient}})
	if err != nil {
		t.Fatal(err)
	}
	sc, err := cluster.Load(config.Cluster{CA: sched.CA, Cert: sched.Cert, Key: sched.Key})
	if err != nil {
		t.Fatal(err)
	}
	schedAddr, _ := testenv.StartTLSScheduler(t, sc)

	reg := testenv.StartRegistry(t)
	image, _ := pushIndex(t, reg, "preheat/tls:1")
	cfgPath := filepath.Join(t.TempDir(), "starlingd.toml")
	os.WriteFile(cfgPath, []byte("[cluster]\nca = \""+ops.CA+"\"\ncert = \""+ops.Cert+"\"\nkey = \""+ops.Key+"\"\n"), 0o644)

	// Without a certificate the scheduler is never reached; with the
	// configuration's, it answers (that no seed is there).
	_, _, err = runCmd(t, newPreheatCmd, "--scheduler", schedAddr, "--timeout", "5s", image)
	if err == nil || strings.Contains(err.Error(), "no live seed") {
		t.Fatalf("without a certificate: %v", err)
	}
	_, _, err = runCmdConfig(t, cfgPath, newPreheatCmd, "--scheduler", schedAddr, "--timeout", "20s", image)
	if err == nil || !strings.Contains(err.Error(), "no live seed") {
		t.Fatalf("with the configuration's certificate: %v", err)
	}
}

// runCmdConfig is runCmd with a configuration file.
func runCmdConfig(t *testing.T, cfgPath string, mk func() *cobra.Command, args ...string) (string, string, error) {
	t.Helper()
	return runCmd(t, func() *cobra.Command {
		g.configPath = cfgPath
		return mk()
	}, args...)
}
