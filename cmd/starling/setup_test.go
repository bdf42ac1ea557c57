package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/BurntSushi/toml"
)

func TestSetupContainerdWriteMerges(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "config.toml")
	orig := "version = 2\nroot = \"/var/lib/containerd\"\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"/etc/containerd/certs.d\"\n"
	if err := os.WriteFile(path, []byte(orig), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := newSetupCmd()
	cmd.SetArgs([]string{"containerd", "--write", "--config-path", path})
	g.configPath = filepath.Join(dir, "none.toml")
	if err := cmd.Execute(); err != nil {
		t.Fatal(err)
	}
	var got map[string]any
	if _, err := toml.DecodeFile(path, &got); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(path)
	s := string(b)
	for _, want := range []string{`root = "/var/lib/containerd"`, `config_path = "/etc/containerd/certs.d"`, `snapshotter = "starling"`, `disable_snapshot_annotations = false`, `address = "/run/starling/starlingd.sock"`} {
		if !strings.Contains(s, want) {
			t.Errorf("merged file lacks %s:\n%s", want, s)
		}
	}
	if _, err := os.Stat(path + ".bak"); err != nil {
		t.Error("no backup of the old file")
	}
	// containerd accepts the result.
	if _, err := exec.LookPath("containerd"); err == nil {
		out, err := exec.Command("containerd", "--config", path, "config", "dump").CombinedOutput()
		if err != nil {
			t.Fatalf("containerd rejects the file: %v\n%s", err, out)
		}
		if !strings.Contains(string(out), `snapshotter = "starling"`) {
			t.Fatalf("containerd does not see the snapshotter:\n%s", out)
		}
	}
}
