package treediff

import (
	"maps"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

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

// TestEveryFieldCompared changes one field of a node at a time: each change
// must show as a difference naming that field, so no field of Node is
// recorded and then ignored.
func TestEveryFieldCompared(t *testing.T) {
	base := Node{Type: "file", Mode: 0o644, UID: 1, GID: 2, Size: 3, SHA256: "ab", Link: "l", Rdev: "1:3",
		Xattrs: map[string]string{"user.a": "01"}, Nlink: 2, LinkSet: "a|b", Mtime: 100}
	changes := map[string]func(*Node){
		"Type":    func(n *Node) { n.Type = "fifo" },
		"Mode":    func(n *Node) { n.Mode = 0o4644 },
		"UID":     func(n *Node) { n.UID = 100000 },
		"GID":     func(n *Node) { n.GID = 4294967294 },
		"Size":    func(n *Node) { n.Size = 4 },
		"SHA256":  func(n *Node) { n.SHA256 = "cd" },
		"Link":    func(n *Node) { n.Link = "m" },
		"Rdev":    func(n *Node) { n.Rdev = "1:4" },
		"Xattrs":  func(n *Node) { n.Xattrs = map[string]string{"user.a": "02"} },
		"Nlink":   func(n *Node) { n.Nlink = 3 },
		"LinkSet": func(n *Node) { n.LinkSet = "a|c" },
		"Mtime":   func(n *Node) { n.Mtime = 101 },
	}
	want := map[string]string{"Type": "type", "Mode": "mode", "UID": "owner", "GID": "owner", "Size": "size",
		"SHA256": "content", "Link": "link target", "Rdev": "device", "Xattrs": "xattrs", "Nlink": "link count",
		"LinkSet": "hardlinks", "Mtime": "mtime"}
	for i := 0; i < reflect.TypeOf(Node{}).NumField(); i++ {
		if _, ok := changes[reflect.TypeOf(Node{}).Field(i).Name]; !ok {
			t.Errorf("field %s has no change in this test", reflect.TypeOf(Node{}).Field(i).Name)
		}
	}
	for field, change := range changes {
		b := base
		b.Xattrs = maps.Clone(base.Xattrs)
		change(&b)
		d := Diff(Tree{"p": base}, Tree{"p": b})
		if len(d) != 1 || !strings.HasPrefix(d[0], "p: "+want[field]+" ") {
			t.Errorf("%s changed: diff %q, want one line about %q", field, d, want[field])
		}
	}
	// An xattr more, or an empty value against none, is a difference too.
	for _, x := range []map[string]string{nil, {"user.a": "01", "user.b": ""}, {"user.b": "01"}} {
		b := base
		b.Xattrs = x
		if d := Diff(Tree{"p": base}, Tree{"p": b}); len(d) != 1 {
			t.Errorf("xattrs %v: diff %q", x, d)
		}
	}
	if d := Diff(Tree{"p": base}, Tree{"p": base, "q\nr": base}); len(d) != 1 || d[0] != `"q\nr": only in second (file)` {
		t.Errorf("a path with a newline: %q", d)
	}
}

// TestSnapshotRecordsStrictly: what Snapshot records from a real tree,
// field by field, for the kinds of entry whose bookkeeping differs.
func TestSnapshotRecordsStrictly(t *testing.T) {
	d := build(t)
	f := filepath.Join(d, "a/f")
	mt := time.Date(1999, 12, 31, 23, 59, 58, 0, time.UTC)
	if err := unix.Chmod(f, 0o4750); err != nil {
		t.Fatal(err)
	}
	if err := os.Chtimes(f, mt, mt); err != nil {
		t.Fatal(err)
	}
	if err := unix.Lutimes(filepath.Join(d, "a/b/l"), []unix.Timeval{{Sec: 5}, {Sec: 5}}); err != nil {
		t.Fatal(err)
	}
	tr, err := Snapshot(d)
	if err != nil {
		t.Fatal(err)
	}
	if n := tr["a/f"]; n.Mode != 0o4750 || n.Mtime != mt.Unix() || n.Nlink != 2 || n.Size != 1 {
		t.Errorf("a/f: %+v", n)
	}
	if n := tr["a/b/l"]; n.Size != int64(len("../f")) || n.Mtime != 5 || n.Mode != 0o777 {
		t.Errorf("symlink: %+v", n)
	}
	if n := tr["a"]; n.Nlink != 3 || n.Size != 0 {
		t.Errorf("directory a (holds one directory): %+v", n)
	}
	if n := tr["."]; n.Mtime != 0 {
		t.Errorf("root time recorded: %+v", n)
	}
	if err := os.Chtimes(filepath.Join(d, "a/b"), mt, mt); err != nil {
		t.Fatal(err)
	}
	tr2, err := Snapshot(d)
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(Diff(tr, tr2), "\n"); !strings.Contains(got, "a/b: mtime") {
		t.Errorf("directory mtime change not seen: %q", got)
	}
}
