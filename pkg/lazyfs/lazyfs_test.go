package lazyfs

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/stargz-snapshotter/estargz"
	"go.uber.org/goleak"
	"golang.org/x/sys/unix"

	"github.com/starling-dev/starling/internal/testimage"
	"github.com/starling-dev/starling/pkg/blob"
	"github.com/starling-dev/starling/pkg/chunkcache"
	"github.com/starling-dev/starling/pkg/toc"
)

// ent is a tar entry of a test layer.
type ent = testimage.Entry

// esgz builds an eStargz blob of the entries with the reference builder
// and indexes its TOC.
func esgz(t *testing.T, ents []ent) (*toc.Index, []byte) {
	t.Helper()
	data, dg, err := testimage.Layer(ents).EStargz(4096)
	if err != nil {
		t.Fatal(err)
	}
	ix, err := toc.Load(bytes.NewReader(data), int64(len(data)), new(estargz.GzipDecompressor), toc.Limits{})
	if err != nil {
		t.Fatal(err)
	}
	if ix.TOCDigest != dg {
		t.Fatalf("TOC digest %s, estargz says %s", ix.TOCDigest, dg)
	}
	return ix, data
}

type memFetcher struct {
	blob []byte
	n    atomic.Int64
	fail atomic.Bool
}

func (m *memFetcher) Fetch(ctx context.Context, off, length int64) (io.ReadCloser, error) {
	m.n.Add(1)
	if m.fail.Load() {
		return nil, errors.New("origin is down")
	}
	return io.NopCloser(bytes.NewReader(m.blob[off : off+length])), nil
}

// countingChunks counts the reads that reach the daemon.
type countingChunks struct {
	*blob.Reader
	reads atomic.Int64
}

func (c *countingChunks) ReadAt(ctx context.Context, ch toc.Chunk, p []byte, off int64) (int, error) {
	c.reads.Add(1)
	return c.Reader.ReadAt(ctx, ch, p, off)
}

func mount(t *testing.T, passthrough bool) *FS {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root for FUSE")
	}
	f, err := Mount(filepath.Join(t.TempDir(), "mnt"), Options{Passthrough: passthrough})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := f.Unmount(); err != nil {
			t.Error(err)
		}
	})
	return f
}

func addLayer(t *testing.T, f *FS, id string, ents []ent) (string, *memFetcher, *countingChunks) {
	t.Helper()
	ix, data := esgz(t, ents)
	store, err := chunkcache.Open(t.TempDir(), 0)
	if err != nil {
		t.Fatal(err)
	}
	mf := &memFetcher{blob: data}
	r := blob.NewReader(mf, store, blob.Options{Layer: id, Decompressor: new(estargz.GzipDecompressor), FetchTimeout: 2 * time.Second, Attempts: 1})
	t.Cleanup(r.Close)
	cc := &countingChunks{Reader: r}
	dir, err := f.Add(id, &Layer{Index: ix, Chunks: cc, Name: id})
	if err != nil {
		t.Fatal(err)
	}
	return dir, mf, cc
}

func stat(t *testing.T, p string) *syscall.Stat_t {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Lstat(p, &st); err != nil {
		t.Fatal(err)
	}
	return &st
}

// TestMetadataExact: every mode bit, owner, link count, device number,
// xattr and symlink target as the TOC has it.
func TestMetadataExact(t *testing.T) {
	// Registered first, so it runs after the unmount and the readers' Close.
	ignore := goleak.IgnoreCurrent()
	t.Cleanup(func() { goleak.VerifyNone(t, ignore) })
	f := mount(t, false)
	cap := "\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"
	ents := []ent{
		{Name: "d/", Type: tar.TypeDir, Mode: 0o755},
		{Name: "d/sub/", Type: tar.TypeDir, Mode: 0o1777, Xattrs: map[string]string{"trusted.overlay.opaque": "y"}},
		{Name: "d/sub2/", Type: tar.TypeDir, Mode: 0o2750},
		{Name: "f0000", Type: tar.TypeReg, Mode: 0o000, Data: []byte("nobody may read")},
		{Name: "f4755", Type: tar.TypeReg, Mode: 0o4755, Data: []byte("suid")},
		{Name: "f2755", Type: tar.TypeReg, Mode: 0o2755, Data: []byte("sgid")},
		{Name: "f0400", Type: tar.TypeReg, Mode: 0o400, UID: 100000, GID: 100000, Data: []byte("big uid")},
		{Name: "f0111", Type: tar.TypeReg, Mode: 0o111, Data: []byte("x only")},
		{Name: "f7777", Type: tar.TypeReg, Mode: 0o7777, Data: []byte("all")},
		{Name: "cap", Type: tar.TypeReg, Mode: 0o755, Data: []byte("cap"), Xattrs: map[string]string{"security.capability": cap, "user.k": "v", "trusted.overlay.redirect": "/etc"}},
		{Name: "d/hard", Type: tar.TypeLink, Link: "f4755", Mode: 0o4755},
		{Name: "d/sub/hard2", Type: tar.TypeLink, Link: "f4755", Mode: 0o4755},
		{Name: "sym", Type: tar.TypeSymlink, Link: "/etc/../nowhere", Xattrs: map[string]string{"trusted.overlay.opaque": "y"}},
		{Name: "chr", Type: tar.TypeChar, Mode: 0o620, Major: 4, Minor: 300},
		{Name: "blk", Type: tar.TypeBlock, Mode: 0o660, Major: 259, Minor: 70000},
		{Name: "fifo", Type: tar.TypeFifo, Mode: 0o600},
		{Name: "empty", Type: tar.TypeReg, Mode: 0o644},
		{Name: "name with spaces\nand newline", Type: tar.TypeReg, Mode: 0o644, Data: []byte("odd name")},
		{Name: "big", Type: tar.TypeReg, Mode: 0o644, Data: []byte(strings.Repeat("0123456789abcdef", 5000))},
		{Name: "d/.wh.gone", Type: tar.TypeReg, Mode: 0o644},
		{Name: "d/sub2/.wh..wh..opq", Type: tar.TypeReg, Mode: 0o644},
	}
	dir, _, _ := addLayer(t, f, "l1", ents)
	modes := map[string]uint32{
		"f0000": 0o000, "f4755": 0o4755, "f2755": 0o2755, "f0400": 0o400, "f0111": 0o111, "f7777": 0o7777,
		"d": 0o755, "d/sub": 0o1777, "d/sub2": 0o2750, "chr": 0o620, "blk": 0o660, "fifo": 0o600,
	}
	for p, want := range modes {
		if got := stat(t, filepath.Join(dir, p)).Mode & 0o7777; got != want {
			t.Errorf("%s: mode %#o, want %#o", p, got, want)
		}
	}
	if st := stat(t, filepath.Join(dir, "f0400")); st.Uid != 100000 || st.Gid != 100000 {
		t.Errorf("uid/gid %d/%d", st.Uid, st.Gid)
	}
	h1, h2, h3 := stat(t, filepath.Join(dir, "f4755")), stat(t, filepath.Join(dir, "d/hard")), stat(t, filepath.Join(dir, "d/sub/hard2"))
	if h1.Ino != h2.Ino || h1.Ino != h3.Ino || h1.Nlink != 3 {
		t.Errorf("hard links: inodes %d %d %d, nlink %d", h1.Ino, h2.Ino, h3.Ino, h1.Nlink)
	}
	if st := stat(t, filepath.Join(dir, "d")); st.Nlink != 4 {
		t.Errorf("d: nlink %d, want 2 + 2 subdirectories", st.Nlink)
	}
	if st := stat(t, filepath.Join(dir, "chr")); st.Mode&syscall.S_IFMT != syscall.S_IFCHR || unix.Major(st.Rdev) != 4 || unix.Minor(st.Rdev) != 300 {
		t.Errorf("chr: mode %#o rdev %d:%d", st.Mode, unix.Major(st.Rdev), unix.Minor(st.Rdev))
	}
	if st := stat(t, filepath.Join(dir, "blk")); st.Mode&syscall.S_IFMT != syscall.S_IFBLK || unix.Major(st.Rdev) != 259 || unix.Minor(st.Rdev) != 70000 {
		t.Errorf("blk: mode %#o rdev %d:%d", st.Mode, unix.Major(st.Rdev), unix.Minor(st.Rdev))
	}
	if st := stat(t, filepath.Join(dir, "fifo")); st.Mode&syscall.S_IFMT != syscall.S_IFIFO {
		t.Errorf("fifo: mode %#o", st.Mode)
	}
	if st := stat(t, filepath.Join(dir, "f0000")); !time.Unix(st.Mtim.Unix()).Equal(testimage.Epoch) {
		t.Errorf("mtime %v", time.Unix(st.Mtim.Unix()))
	}
	if l, err := os.Readlink(filepath.Join(dir, "sym")); err != nil || l != "/etc/../nowhere" {
		t.Errorf("symlink %q %v", l, err)
	}
	buf := make([]byte, 64)
	getx := func(p, name string) (string, error) {
		n, err := unix.Lgetxattr(p, name, buf)
		if err != nil {
			return "", err
		}
		return string(buf[:n]), nil
	}
	if v, err := getx(filepath.Join(dir, "cap"), "security.capability"); err != nil || v != cap {
		t.Errorf("security.capability %q %v", v, err)
	}
	// As containerd's unpack, never a trusted.* attribute from the layer:
	// overlayfs would obey a trusted.overlay.* one.
	for _, p := range []string{"sym", "cap", "d/sub"} {
		if v, err := getx(filepath.Join(dir, p), "trusted.overlay.opaque"); err == nil {
			t.Errorf("%s: trusted.overlay.opaque %q from the layer shows", p, v)
		}
	}
	if v, err := getx(filepath.Join(dir, "d/sub2"), "trusted.overlay.opaque"); err != nil || v != "y" {
		t.Errorf("opaque %q %v", v, err)
	}
	if st := stat(t, filepath.Join(dir, "d/gone")); st.Mode&syscall.S_IFMT != syscall.S_IFCHR || st.Rdev != 0 {
		t.Errorf("whiteout: mode %#o rdev %d", st.Mode, st.Rdev)
	}
	for _, e := range ents {
		if e.Type != tar.TypeReg || strings.Contains(e.Name, ".wh.") {
			continue
		}
		got, err := os.ReadFile(filepath.Join(dir, e.Name))
		if err != nil || string(got) != string(e.Data) {
			t.Errorf("%s: %d bytes, %v", e.Name, len(got), err)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, estargz.TOCTarName)); !os.IsNotExist(err) {
		t.Errorf("the TOC shows in the tree: %v", err)
	}
}

// TestReadFailsWithEIO: a read whose chunk cannot be fetched gets EIO; the
// filesystem keeps serving other layers.
func TestReadFailsWithEIO(t *testing.T) {
	f := mount(t, false)
	bad, mf, _ := addLayer(t, f, "bad", []ent{{Name: "a", Type: tar.TypeReg, Mode: 0o644, Data: []byte("unreachable")}})
	good, _, _ := addLayer(t, f, "good", []ent{{Name: "b", Type: tar.TypeReg, Mode: 0o644, Data: []byte("fine")}})
	mf.fail.Store(true)
	if _, err := os.ReadFile(filepath.Join(bad, "a")); !errors.Is(err, syscall.EIO) {
		t.Fatalf("want EIO, got %v", err)
	}
	if b, err := os.ReadFile(filepath.Join(good, "b")); err != nil || string(b) != "fine" {
		t.Fatalf("other layer: %q %v", b, err)
	}
	// The origin is back: the same read succeeds (once the brief memory
	// of the failure, which spares the kernel's retries, has passed).
	mf.fail.Store(false)
	time.Sleep(600 * time.Millisecond)
	if b, err := os.ReadFile(filepath.Join(bad, "a")); err != nil || string(b) != "unreachable" {
		t.Fatalf("after the origin came back: %q %v", b, err)
	}
}

// TestRemoveKeepsOthers: a removed layer disappears; the others stay.
func TestRemoveKeepsOthers(t *testing.T) {
	f := mount(t, false)
	a, _, _ := addLayer(t, f, "a", []ent{{Name: "x", Type: tar.TypeReg, Mode: 0o644, Data: []byte("x")}})
	b, _, _ := addLayer(t, f, "b", []ent{{Name: "y", Type: tar.TypeReg, Mode: 0o644, Data: []byte("y")}})
	f.Remove("a")
	if _, err := os.Stat(a); !os.IsNotExist(err) {
		t.Fatalf("removed layer still there: %v", err)
	}
	if got, err := os.ReadFile(filepath.Join(b, "y")); err != nil || string(got) != "y" {
		t.Fatalf("%q %v", got, err)
	}
	if _, err := f.Add("b", &Layer{}); err == nil {
		t.Fatal("a second layer under one name was accepted")
	}
}

// TestDeepTree: a tree as deep as PATH_MAX allows is built without
// recursion and read back.
func TestDeepTree(t *testing.T) {
	f := mount(t, false)
	var ents []ent
	p := ""
	for len(p) < 3800 {
		p += strings.Repeat("d", 200) + "/"
		ents = append(ents, ent{Name: p, Type: tar.TypeDir, Mode: 0o755})
	}
	ents = append(ents, ent{Name: p + "leaf", Type: tar.TypeReg, Mode: 0o644, Data: []byte("deep")})
	dir, _, _ := addLayer(t, f, "deep", ents)
	// Walk down relative to each directory: the whole path is longer than
	// one system call takes.
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY, 0)
	if err != nil {
		t.Fatal(err)
	}
	for _, part := range strings.Split(strings.TrimSuffix(p, "/"), "/") {
		nfd, err := unix.Openat(fd, part, unix.O_RDONLY|unix.O_DIRECTORY, 0)
		unix.Close(fd)
		if err != nil {
			t.Fatal(err)
		}
		fd = nfd
	}
	lf, err := unix.Openat(fd, "leaf", unix.O_RDONLY, 0)
	unix.Close(fd)
	if err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 8)
	n, _ := unix.Read(lf, b)
	unix.Close(lf)
	if string(b[:n]) != "deep" {
		t.Fatalf("%q", b[:n])
	}
}

// TestPassthroughServesLocalFiles: once a file's bytes are local, an open
// of it is served by the kernel: no read reaches the daemon.
func TestPassthroughServesLocalFiles(t *testing.T) {
	f := mount(t, true)
	if !f.Passthrough() {
		t.Skip("the kernel does not offer FUSE passthrough")
	}
	small := strings.Repeat("s", 3000)
	large := strings.Repeat("0123456789", 3000) // several chunks
	dir, _, cc := addLayer(t, f, "p", []ent{
		{Name: "small", Type: tar.TypeReg, Mode: 0o644, Data: []byte(small)},
		{Name: "large", Type: tar.TypeReg, Mode: 0o644, Data: []byte(large)},
	})
	for name, want := range map[string]string{"small": small, "large": large} {
		if b, err := os.ReadFile(filepath.Join(dir, name)); err != nil || string(b) != want {
			t.Fatalf("%s: %d bytes %v", name, len(b), err)
		}
	}
	// A multi-chunk file is assembled in the background after an open
	// finds it local; wait for it.
	deadline := time.Now().Add(10 * time.Second)
	for {
		before := cc.reads.Load()
		for name, want := range map[string]string{"small": small, "large": large} {
			fd, err := os.Open(filepath.Join(dir, name))
			if err != nil {
				t.Fatal(err)
			}
			// Drop the FUSE inode's page cache so a read must go somewhere.
			_ = unix.Fadvise(int(fd.Fd()), 0, 0, unix.FADV_DONTNEED)
			b, err := io.ReadAll(fd)
			fd.Close()
			if err != nil || string(b) != want {
				t.Fatalf("%s via passthrough: %d bytes %v", name, len(b), err)
			}
		}
		t.Logf("reads this round: %d", cc.reads.Load()-before)
		if cc.reads.Load() == before {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d reads still reach the daemon for local files", cc.reads.Load()-before)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestOpenWhileOpenInOtherMode: a file opened before its bytes were local
// (as exec keeps a binary open) can be opened again once they are; the
// kernel refuses a passthrough open while the inode is open in caching mode.
func TestOpenWhileOpenInOtherMode(t *testing.T) {
	f := mount(t, true)
	data := strings.Repeat("exec me ", 1000)
	dir, _, _ := addLayer(t, f, "x", []ent{{Name: "bin", Type: tar.TypeReg, Mode: 0o755, Data: []byte(data)}})
	first, err := os.Open(filepath.Join(dir, "bin"))
	if err != nil {
		t.Fatal(err)
	}
	defer first.Close()
	if b, err := io.ReadAll(first); err != nil || string(b) != data {
		t.Fatalf("%d bytes %v", len(b), err)
	}
	for i := 0; i < 3; i++ {
		if b, err := os.ReadFile(filepath.Join(dir, "bin")); err != nil || string(b) != data {
			t.Fatalf("open %d while the first is open: %d bytes %v", i, len(b), err)
		}
	}
	first.Close()
	// Now local and nothing open: passthrough; a second open meanwhile too.
	time.Sleep(100 * time.Millisecond) // the release reaches the daemon asynchronously
	a, err := os.Open(filepath.Join(dir, "bin"))
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	if b, err := os.ReadFile(filepath.Join(dir, "bin")); err != nil || string(b) != data {
		t.Fatalf("second open alongside a passthrough one: %d bytes %v", len(b), err)
	}
}
