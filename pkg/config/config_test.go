package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestLoad(t *testing.T) {
	dir := t.TempDir()
	if _, err := Load(filepath.Join(dir, "missing.toml"), false); err != nil {
		t.Fatalf("a missing optional file: %v", err)
	}
	if _, err := Load(filepath.Join(dir, "missing.toml"), true); err == nil {
		t.Fatal("a missing named file was accepted")
	}
	p := filepath.Join(dir, "s.toml")
	os.WriteFile(p, []byte(`root = "/srv/starling"
[fs]
prefetch = false
fetch_timeout = "3s"
[origin]
max_requests_per_host = 4
[resolver]
retries = 1
[resolver.host."reg.example:5000"]
insecure = true
  [[resolver.host."reg.example:5000".mirrors]]
  host = "127.0.0.1:4001"
  header = { X-Dragonfly-Registry = ["https://reg.example:5000"] }
`), 0o644)
	c, err := Load(p, true)
	if err != nil {
		t.Fatal(err)
	}
	if c.Root != "/srv/starling" || c.FS.Prefetch || c.FS.FetchTimeout != 3*time.Second || !c.FS.BackgroundFetch || c.Resolver.Retries != 1 {
		t.Fatalf("loaded %+v", c)
	}
	if c.Origin.MaxRequestsPerHost != 4 || Default().Origin.MaxRequestsPerHost != 16 {
		t.Fatalf("origin %+v, default %+v", c.Origin, Default().Origin)
	}
	h := c.Resolver.Host["reg.example:5000"]
	if !h.Insecure || len(h.Mirrors) != 1 || h.Mirrors[0].Header["X-Dragonfly-Registry"][0] != "https://reg.example:5000" {
		t.Fatalf("host %+v", h)
	}
	if c.Snapshotter.Address != "/run/starling/starlingd.sock" || c.Resolver.RequestTimeout != 30*time.Second {
		t.Fatal("defaults lost for keys the file does not name")
	}
	os.WriteFile(p, []byte("[fs]\nprefetsh = true\n"), 0o644)
	if _, err := Load(p, true); err == nil || !strings.Contains(err.Error(), "fs.prefetsh") {
		t.Fatalf("a typo was accepted: %v", err)
	}
}
