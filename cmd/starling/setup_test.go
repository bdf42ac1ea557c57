package main

import (
	"io"
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

// hostsFile is what containerd reads of a hosts.toml.
type hostsFile struct {
	Server string `toml:"server"`
	Host   map[string]struct {
		Capabilities []string `toml:"capabilities"`
	} `toml:"host"`
}

func runSetup(t *testing.T, args ...string) string {
	t.Helper()
	cmd := newSetupCmd()
	var out strings.Builder
	cmd.SetOut(&out)
	cmd.SetErr(&out)
	cmd.SetArgs(append([]string{"containerd"}, args...))
	if err := cmd.Execute(); err != nil {
		t.Fatalf("setup containerd %s: %v\n%s", strings.Join(args, " "), err, out.String())
	}
	return out.String()
}

func TestSetupContainerdMirror(t *testing.T) {
	dir := t.TempDir()
	hostsDir := filepath.Join(dir, "certs.d")
	cfgPath := filepath.Join(dir, "config.toml")
	if err := os.WriteFile(cfgPath, []byte("version = 2\nroot = \"/var/lib/containerd\"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	// The daemon's configuration: one insecure registry, the proxy on every address.
	g.configPath = filepath.Join(dir, "starlingd.toml")
	os.WriteFile(g.configPath, []byte("[proxy]\nlisten = \":4555\"\n[resolver.host.\"reg.lan:5000\"]\ninsecure = true\n"), 0o644)
	t.Cleanup(func() { g.configPath = "" })

	args := []string{"--mirror", "--hosts-dir", hostsDir, "--config-path", cfgPath,
		"--registry", "docker.io", "--registry", "reg.lan:5000", "--registry", "ghcr.io", "--registry", "_default"}

	// Without --write: printed, nothing written.
	out := runSetup(t, args...)
	if !strings.Contains(out, filepath.Join(hostsDir, "docker.io", "hosts.toml")) || !strings.Contains(out, `config_path = "`+hostsDir+`"`) {
		t.Fatalf("printed:\n%s", out)
	}
	if _, err := os.Stat(hostsDir); err == nil {
		t.Fatal("wrote files without --write")
	}

	out = runSetup(t, append(args, "--write")...)
	want := map[string]string{
		"docker.io":    "https://registry-1.docker.io",
		"reg.lan:5000": "http://reg.lan:5000",
		"ghcr.io":      "https://ghcr.io",
		"_default":     "",
	}
	for host, server := range want {
		p := filepath.Join(hostsDir, host, "hosts.toml")
		var hf hostsFile
		md, err := toml.DecodeFile(p, &hf)
		if err != nil {
			t.Fatalf("%s: %v", p, err)
		}
		if und := md.Undecoded(); len(und) > 0 {
			t.Errorf("%s: unexpected keys %v", p, und)
		}
		if hf.Server != server {
			t.Errorf("%s: server %q, want %q", p, hf.Server, server)
		}
		m, ok := hf.Host["http://127.0.0.1:4555"]
		if len(hf.Host) != 1 || !ok || strings.Join(m.Capabilities, ",") != "pull,resolve" {
			t.Errorf("%s: hosts %+v, want the mirror at http://127.0.0.1:4555 for pull and resolve", p, hf.Host)
		}
		if !strings.Contains(out, "wrote "+p) {
			t.Errorf("output does not say it wrote %s:\n%s", p, out)
		}
	}
	var cfg map[string]any
	if _, err := toml.DecodeFile(cfgPath, &cfg); err != nil {
		t.Fatal(err)
	}
	if got := criRegistry(cfg)["config_path"]; got != hostsDir {
		t.Fatalf("config_path = %v, want %s", got, hostsDir)
	}
	if cfg["root"] != "/var/lib/containerd" {
		t.Fatal("the rest of containerd's configuration was lost")
	}

	// Again: nothing changes.
	before, _ := os.ReadFile(filepath.Join(hostsDir, "docker.io", "hosts.toml"))
	out = runSetup(t, append(args, "--write")...)
	if strings.Contains(out, "wrote") || !strings.Contains(out, "up to date") {
		t.Fatalf("a second run wrote again:\n%s", out)
	}
	after, _ := os.ReadFile(filepath.Join(hostsDir, "docker.io", "hosts.toml"))
	if string(before) != string(after) {
		t.Fatal("a second run changed hosts.toml")
	}
	if _, err := os.Stat(filepath.Join(hostsDir, "docker.io", "hosts.toml.bak")); err == nil {
		t.Fatal("a second run left a backup of an identical file")
	}

	// A config_path that containerd already reads is where the files go.
	other := filepath.Join(dir, "other.d")
	os.WriteFile(cfgPath, []byte("version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \""+other+"\"\n"), 0o644)
	runSetup(t, "--mirror", "--write", "--config-path", cfgPath, "--registry", "quay.io", "--mirror-address", "10.0.0.1:4001")
	var hf hostsFile
	if _, err := toml.DecodeFile(filepath.Join(other, "quay.io", "hosts.toml"), &hf); err != nil {
		t.Fatal(err)
	}
	if _, ok := hf.Host["http://10.0.0.1:4001"]; !ok {
		t.Fatalf("--mirror-address not used: %+v", hf.Host)
	}

	// The old mirrors table cannot live beside config_path.
	os.WriteFile(cfgPath, []byte("version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors.\"docker.io\"]\n  endpoint = [\"https://m.example\"]\n"), 0o644)
	cmd := newSetupCmd()
	cmd.SetOut(io.Discard)
	cmd.SetErr(io.Discard)
	cmd.SetArgs([]string{"containerd", "--mirror", "--write", "--config-path", cfgPath, "--hosts-dir", hostsDir})
	if err := cmd.Execute(); err == nil || !strings.Contains(err.Error(), "mirrors") {
		t.Fatalf("a configuration with registry.mirrors was accepted: %v", err)
	}

	// containerd accepts the result.
	if _, err := exec.LookPath("containerd"); err == nil {
		os.WriteFile(cfgPath, []byte("version = 2\n"), 0o644)
		runSetup(t, "--mirror", "--write", "--config-path", cfgPath, "--hosts-dir", hostsDir)
		out, err := exec.Command("containerd", "--config", cfgPath, "config", "dump").CombinedOutput()
		if err != nil || !strings.Contains(string(out), `config_path = "`+hostsDir+`"`) {
			t.Fatalf("containerd config dump: %v\n%s", err, out)
		}
	}
}

func TestContainerdVersion(t *testing.T) {
	for s, want := range map[string][2]int{
		"containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+deb12u3":                  {1, 6},
		"containerd github.com/containerd/containerd v1.7.13 7c3aca7a610df76212171d200ca3811ff6096eb8": {1, 7},
		"containerd containerd.io 2.0.0 207ad711eabd375a01713109a8a197d197ff6542":                      {2, 0},
	} {
		ma, mi, ok := containerdVersion(s)
		if !ok || ma != want[0] || mi != want[1] {
			t.Errorf("%q: %d.%d %v", s, ma, mi, ok)
		}
	}
}
