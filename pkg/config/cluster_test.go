package config

import (
	"os"
	"path/filepath"
	"testing"
)

func TestClusterSection(t *testing.T) {
	dir := t.TempDir()
	for _, name := range []string{"starlingd.toml", "scheduler.toml"} {
		p := filepath.Join(dir, name)
		os.WriteFile(p, []byte("[cluster]\nca = \"/pki/ca.crt\"\ncert = \"/pki/n.crt\"\nkey = \"/pki/n.key\"\ninsecure = true\n"), 0o644)
		want := Cluster{CA: "/pki/ca.crt", Cert: "/pki/n.crt", Key: "/pki/n.key", Insecure: true}
		var got Cluster
		if name == "starlingd.toml" {
			c, err := Load(p, true)
			if err != nil {
				t.Fatal(err)
			}
			got = c.Cluster
		} else {
			c, err := LoadScheduler(p, true)
			if err != nil {
				t.Fatal(err)
			}
			got = c.Cluster
		}
		if got != want || !got.TLS() || got.Validate() != nil {
			t.Fatalf("%s: %+v", name, got)
		}
	}
	if (Cluster{CA: "ca"}).Validate() == nil || (Cluster{Cert: "c", Key: "k"}).Validate() == nil || (Cluster{}).Validate() != nil {
		t.Fatal("half-configured identities pass")
	}
}
