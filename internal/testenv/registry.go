package testenv

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// Registry is a Debian docker-registry serving from a temporary directory.
type Registry struct {
	// Addr is host:port, reachable from the host's namespace.
	Addr string
	// Dir holds the registry's storage.
	Dir  string
	Proc *Proc
}

// StartRegistry starts docker-registry on a free loopback port.
func StartRegistry(t testing.TB) *Registry {
	t.Helper()
	Require(t, "docker-registry")
	return StartRegistryAt(t, "", fmt.Sprintf("127.0.0.1:%d", FreePort(t)))
}

// StartRegistryAt starts docker-registry listening on addr inside netns ("" for the host's).
func StartRegistryAt(t testing.TB, netns, addr string) *Registry {
	t.Helper()
	dir := t.TempDir()
	cfg := fmt.Sprintf(`version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: %s
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: %s
  secret: starling-test
`, filepath.Join(dir, "data"), addr)
	cfgPath := filepath.Join(dir, "config.yml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	p := StartIn(t, netns, "registry", nil, "docker-registry", "serve", cfgPath)
	r := &Registry{Addr: addr, Dir: dir, Proc: p}
	if netns == "" {
		WaitTCP(t, p, addr, 20*time.Second)
	}
	return r
}
