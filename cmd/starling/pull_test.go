package main

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/starling-dev/starling/pkg/registry/dockerhosts"
)

// TestPullResolverConfig: the configuration's resolver section and
// --plain-http reach the containerd resolver `starling pull` uses (whose
// behaviour against real TLS and plain registries is tested in
// pkg/registry/dockerhosts).
func TestPullResolverConfig(t *testing.T) {
	path := filepath.Join(t.TempDir(), "starlingd.toml")
	if err := os.WriteFile(path, []byte(`
[resolver.host."tls.internal:5000"]
  skip_verify = true
[resolver.host."plain.internal:5000"]
  insecure = true
`), 0o600); err != nil {
		t.Fatal(err)
	}
	// The flags are package state: leave them as the other tests expect.
	saved := g
	t.Cleanup(func() { g = saved })
	scheme := func(plainHTTP bool, host string) (string, bool) {
		t.Helper()
		g = globals{configPath: path, plainHTTP: plainHTTP}
		cfg, err := loadConfig(newPullCmd())
		if err != nil {
			t.Fatal(err)
		}
		hosts, err := dockerhosts.Hosts(cfg.Resolver, nil)(host)
		if err != nil {
			t.Fatal(err)
		}
		return hosts[len(hosts)-1].Scheme, cfg.Resolver.Endpoint(host).SkipVerify
	}
	if s, skip := scheme(false, "tls.internal:5000"); s != "https" || !skip {
		t.Errorf("skip_verify host: %s, skip_verify %v", s, skip)
	}
	if s, skip := scheme(false, "plain.internal:5000"); s != "http" || skip {
		t.Errorf("insecure host: %s, skip_verify %v", s, skip)
	}
	if s, _ := scheme(false, "other.internal:5000"); s != "https" {
		t.Errorf("unconfigured host: %s", s)
	}
	if s, _ := scheme(true, "other.internal:5000"); s != "http" {
		t.Errorf("--plain-http: %s", s)
	}
}
