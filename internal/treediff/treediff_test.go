package treediff

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

func build(t *testing.T) string {
	d := t.TempDir()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.MkdirAll(filepath.Join(d, "a/b"), 0o755))
	must(os.WriteFile(filepath.Join(d, "a/f"), []byte("x"), 0o640))
	must(os.Link(filepath.Join(d, "a/f"), filepath.Join(d, "a/b/g")))
	must(os.Symlink("../f", filepath.Join(d, "a/b/l")))
	must(unix.Mkfifo(filepath.Join(d, "fifo"), 0o600))
	if err := unix.Lsetxattr(filepath.Join(d, "a/f"), "user.k", []byte("v"), 0); err != nil && err != unix.ENOTSUP {
		t.Fatal(err)
	}
	return d
}

func TestEqualTrees(t *testing.T) {
	a, err := Snapshot(build(t))
	if err != nil {
		t.Fatal(err)
	}
	b, err := Snapshot(build(t))
	if err != nil {
		t.Fatal(err)
	}
	if d := Diff(a, b); len(d) != 0 {
		t.Fatalf("equal trees differ: %v", d)
	}
	if a["a/f"].LinkSet != "a/b/g|a/f" {
		t.Fatalf("hardlink group %q", a["a/f"].LinkSet)
	}
}

func TestDifferences(t *testing.T) {
	d1, d2 := build(t), build(t)
	if err := os.WriteFile(filepath.Join(d2, "a/f"), []byte("y"), 0o640); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(filepath.Join(d2, "a/b"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(filepath.Join(d2, "a/b/l")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("elsewhere", filepath.Join(d2, "a/b/l")); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(filepath.Join(d2, "a/b/g")); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(d2, "a/b/g"), []byte("y"), 0o640); err != nil {
		t.Fatal(err)
	}
	a, _ := Snapshot(d1)
	b, _ := Snapshot(d2)
	got := strings.Join(Diff(a, b), "\n")
	for _, want := range []string{"a/f: content", "a/b: mode", "a/b/l: link target", "a/f: hardlinks"} {
		if !strings.Contains(got, want) {
			t.Errorf("diff lacks %q:\n%s", want, got)
		}
	}
}
