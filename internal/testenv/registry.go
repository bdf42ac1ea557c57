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
	return startRegistry(t, netns, addr, "", "")
}

// StartAuthRegistry is StartRegistry behind basic authentication
// (docker-registry's htpasswd): user with the password whose bcrypt hash is
// hash. A low bcrypt cost keeps the check, made on every request, cheap.
func StartAuthRegistry(t testing.TB, user, hash string) *Registry {
	t.Helper()
	Require(t, "docker-registry")
	return startRegistry(t, "", fmt.Sprintf("127.0.0.1:%d", FreePort(t)), user, hash)
}

func startRegistry(t testing.TB, netns, addr, user, hash string) *Registry {
	t.Helper()
	dir := t.TempDir()
	auth := ""
	if user != "" {
		pw := filepath.Join(dir, "htpasswd")
		if err := os.WriteFile(pw, []byte(user+":"+hash+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		auth = fmt.Sprintf("auth:\n  htpasswd:\n    realm: starling-test\n    path: %s\n", pw)
	}
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
`, filepath.Join(dir, "data"), addr) + auth
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
