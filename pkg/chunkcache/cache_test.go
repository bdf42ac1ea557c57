package chunkcache

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

func TestPutGetEvict(t *testing.T) {
	dir := t.TempDir()
	// A leftover of a crashed write is removed, never served.
	os.MkdirAll(filepath.Join(dir, "ab"), 0o700)
	os.WriteFile(filepath.Join(dir, "ab", ".tmp-123"), []byte("partial"), 0o600)
	c, err := Open(dir, 10_000)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, "ab", ".tmp-123")); err == nil {
		t.Fatal("partial write left in place")
	}
	var ds []string
	for i := 0; i < 5; i++ {
		b := []byte(fmt.Sprintf("%04000d", i))
		d := digest.FromBytes(b).String()
		if err := c.Put(d, b); err != nil {
			t.Fatal(err)
		}
		ds = append(ds, d)
		time.Sleep(10 * time.Millisecond)
	}
	p := make([]byte, 4)
	if n, ok := c.ReadAt(ds[4], p, 3996); !ok || string(p[:n]) != "0004" {
		t.Fatalf("ReadAt %q %v", p[:n], ok)
	}
	// Over the limit: the oldest go first.
	deadline := time.Now().Add(5 * time.Second)
	for c.Has(ds[0]) && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if c.Has(ds[0]) || !c.Has(ds[4]) {
		t.Fatalf("eviction kept the oldest or dropped the newest")
	}
	if _, ok := c.Get("sha256:../../etc"); ok {
		t.Fatal("a bad digest was looked up")
	}
}
