package layer_test

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"go.uber.org/goleak"
	"golang.org/x/sys/unix"

	"github.com/starling-dev/starling/internal/testimage"
	"github.com/starling-dev/starling/pkg/blob"
	"github.com/starling-dev/starling/pkg/chunkcache"
	"github.com/starling-dev/starling/pkg/config"
	"github.com/starling-dev/starling/pkg/layer"
	"github.com/starling-dev/starling/pkg/toc/toctest"
)

// memBlob serves a blob from memory, counts requests, can be slowed, and
// records whether its layer closed it: the seam where the registry or the
// P2P peer sits.
type memBlob struct {
	data     []byte
	delay    time.Duration
	requests atomic.Int64
	closed   atomic.Bool

	mu     sync.Mutex
	ranges [][2]int64
}

func (m *memBlob) Fetch(ctx context.Context, off, length int64) (io.ReadCloser, error) {
	m.requests.Add(1)
	m.mu.Lock()
	m.ranges = append(m.ranges, [2]int64{off, off + length})
	m.mu.Unlock()
	if m.delay > 0 {
		select {
		case <-time.After(m.delay):
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	if off < 0 || off+length > int64(len(m.data)) {
		return nil, errors.New("range outside the blob")
	}
	return io.NopCloser(bytes.NewReader(m.data[off : off+length])), nil
}

func (m *memBlob) Close() error { m.closed.Store(true); return nil }

// covered counts the requests that covered blob offset off.
func (m *memBlob) covered(off int64) int {
	m.mu.Lock()
	defer m.mu.Unlock()
	n := 0
	for _, r := range m.ranges {
		if r[0] <= off && off < r[1] {
			n++
		}
	}
	return n
}

type file struct {
	name string
	data []byte
}

// esgzLayer builds an eStargz layer of files with the reference builder.
func esgzLayer(t *testing.T, chunk int, files ...file) ([]byte, v1.Descriptor) {
	t.Helper()
	var l testimage.Layer
	for _, f := range files {
		l = append(l, testimage.Entry{Name: f.name, Type: tar.TypeReg, Mode: 0o644, Data: f.data})
	}
	data, dg, err := l.EStargz(chunk)
	if err != nil {
		t.Fatal(err)
	}
	h, _, _ := v1.SHA256(bytes.NewReader(data))
	return data, v1.Descriptor{MediaType: types.OCILayer, Size: int64(len(data)), Digest: h,
		Annotations: map[string]string{layer.TOCDigestAnnotation: dg.String()}}
}

var repo, _ = name.NewRepository("example.invalid/test")

func memManager(t *testing.T, fs config.FS, store blob.Store, blobs map[v1.Hash]*memBlob) *layer.Manager {
	t.Helper()
	return manager(t, layer.Options{
		Root: t.TempDir(), FS: fs, Store: store,
		Fetcher: func(_ name.Repository, d v1.Descriptor) blob.Fetcher { return blobs[d.Digest] },
	})
}

// mountLayer resolves desc and mounts it on a new directory; the layer is
// unmounted when the test ends (again, if the test did it already).
func mountLayer(t *testing.T, m *layer.Manager, repo name.Repository, desc v1.Descriptor) (*layer.Layer, string) {
	t.Helper()
	l, err := m.Resolve(context.Background(), repo, desc)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	if err := l.Mount(dir); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = l.Unmount() })
	return l, dir
}

func requireRoot(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for FUSE")
	}
}

// TestUnmountEndsBackgroundFetch: removing a layer while its background
// fetch runs ends that fetch, leaves no goroutine of the layer behind and
// releases its download (the fetcher is closed, so the peer's storage can
// collect it).
func TestUnmountEndsBackgroundFetch(t *testing.T) {
	requireRoot(t)
	ignore := goleak.IgnoreCurrent()
	var files []file
	for i := 0; i < 64; i++ {
		files = append(files, file{name: "f" + string(rune('a'+i%26)) + string(rune('a'+i/26)), data: testimage.Random(uint64(i), 64<<10)})
	}
	data, desc := esgzLayer(t, 16<<10, files...)
	mb := &memBlob{data: data, delay: 20 * time.Millisecond}
	fs := config.DefaultFS()
	fs.Prefetch, fs.BackgroundFetch, fs.BackgroundFetchDelay = false, true, 0
	store, _ := chunkcache.Open(t.TempDir(), 0)
	m := memManager(t, fs, store, map[v1.Hash]*memBlob{desc.Digest: mb})
	l, dir := mountLayer(t, m, repo, desc)
	if b, err := os.ReadFile(filepath.Join(dir, files[3].name)); err != nil || !bytes.Equal(b, files[3].data) {
		t.Fatalf("read: %d bytes, %v", len(b), err)
	}
	for mb.requests.Load() < 5 {
		time.Sleep(5 * time.Millisecond)
	}
	if err := l.Unmount(); err != nil {
		t.Fatal(err)
	}
	if !mb.closed.Load() {
		t.Fatal("the layer's download was not released")
	}
	if m.Open() != 0 {
		t.Fatalf("%d layers still open", m.Open())
	}
	after := mb.requests.Load()
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	goleak.VerifyNone(t, ignore)
	if mb.requests.Load() != after {
		t.Fatal("fetching went on after the layer was removed")
	}
	if _, err := os.Stat(filepath.Join(dir, files[3].name)); err == nil {
		t.Fatal("the layer is still visible at its mountpoint")
	}
}

// TestResolvedNeverMountedIsClosed: a layer whose prepare failed after it
// was resolved is closed, and so is its fetcher.
func TestResolvedNeverMountedIsClosed(t *testing.T) {
	ignore := goleak.IgnoreCurrent()
	data, desc := esgzLayer(t, 16<<10, file{"a", testimage.Random(1, 1<<20)})
	mb := &memBlob{data: data, delay: 10 * time.Millisecond}
	fs := config.DefaultFS()
	fs.BackgroundFetchDelay = 0
	store, _ := chunkcache.Open(t.TempDir(), 0)
	m := memManager(t, fs, store, map[v1.Hash]*memBlob{desc.Digest: mb})
	l, err := m.Resolve(context.Background(), repo, desc)
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(30 * time.Millisecond)
	l.Close()
	if !mb.closed.Load() || m.Open() != 0 {
		t.Fatalf("closed %v, %d open", mb.closed.Load(), m.Open())
	}
	goleak.VerifyNone(t, ignore)
}

// TestHostileLayersRefused: every crafted layer of the corpus is refused at
// resolve with an error naming it and the entry; nothing panics, and a
// layer mounted before keeps serving.
func TestHostileLayersRefused(t *testing.T) {
	requireRoot(t)
	goodData, goodDesc := esgzLayer(t, 16<<10, file{"good", []byte("still here")})
	blobs := map[v1.Hash]*memBlob{goodDesc.Digest: {data: goodData}}
	cases := toctest.Hostile()
	descs := make([]v1.Descriptor, len(cases))
	for i, c := range cases {
		h, _, _ := v1.SHA256(bytes.NewReader(c.Blob))
		blobs[h] = &memBlob{data: c.Blob}
		descs[i] = v1.Descriptor{MediaType: types.MediaType(c.MediaType), Size: int64(len(c.Blob)), Digest: h,
			Annotations: map[string]string{layer.TOCDigestAnnotation: c.TOCDigest.String()}}
	}
	store, _ := chunkcache.Open(t.TempDir(), 0)
	fs := config.DefaultFS()
	fs.BackgroundFetch = false
	m := memManager(t, fs, store, blobs)
	_, dir := mountLayer(t, m, repo, goodDesc)
	for i, c := range cases {
		t.Run(c.Name, func(t *testing.T) {
			mfs := fs
			if c.Limits.MaxTOCSize > 0 {
				mfs.MaxTOCSize = c.Limits.MaxTOCSize
			}
			if c.Limits.MaxEntries > 0 {
				mfs.MaxTOCEntries = c.Limits.MaxEntries
			}
			if c.Limits.MaxChunkSize > 0 {
				mfs.MaxChunkSize = c.Limits.MaxChunkSize
			}
			mm := m
			if mfs != fs {
				mm = memManager(t, mfs, store, blobs)
			}
			l, err := mm.Resolve(context.Background(), repo, descs[i])
			if err == nil {
				l.Close()
			}
			if werr := c.Want(err); werr != nil {
				t.Fatal(werr)
			}
			if !strings.Contains(err.Error(), descs[i].Digest.String()) {
				t.Fatalf("error does not name the layer: %v", err)
			}
			t.Logf("refused: %v", err)
			if b, err := os.ReadFile(filepath.Join(dir, "good")); err != nil || string(b) != "still here" {
				t.Fatalf("the good layer stopped serving: %q %v", b, err)
			}
		})
	}
	if m.Open() != 1 {
		t.Fatalf("%d layers open, want only the good one", m.Open())
	}
}

// TestHotSetSurvivesQuota: reading far more than the chunk store holds
// while a hot set is read again and again keeps the hot set cached (its
// chunks are fetched once) and the store within its quota.
func TestHotSetSurvivesQuota(t *testing.T) {
	requireRoot(t)
	const quota = 1 << 20
	hot := []file{{"hot1", testimage.Random(1, 100<<10)}, {"hot2", testimage.Random(2, 100<<10)}}
	files := append([]file{}, hot...)
	for i := 0; i < 40; i++ {
		files = append(files, file{"cold" + string(rune('A'+i)), testimage.Random(uint64(10+i), 200<<10)})
	}
	data, desc := esgzLayer(t, 64<<10, files...)
	mb := &memBlob{data: data}
	store, err := chunkcache.Open(t.TempDir(), quota)
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	fs := config.DefaultFS()
	fs.Prefetch, fs.BackgroundFetch, fs.Passthrough = false, false, false
	m := memManager(t, fs, store, map[v1.Hash]*memBlob{desc.Digest: mb})
	l, dir := mountLayer(t, m, repo, desc)
	read := func(f file) {
		t.Helper()
		fd, err := os.Open(filepath.Join(dir, f.name))
		if err != nil {
			t.Fatal(err)
		}
		defer fd.Close()
		// Drop the kernel's copy: every read must come from the store.
		_ = unix.Fadvise(int(fd.Fd()), 0, 0, unix.FADV_DONTNEED)
		b, err := io.ReadAll(fd)
		if err != nil || !bytes.Equal(b, f.data) {
			t.Fatalf("%s: %d bytes, %v", f.name, len(b), err)
		}
		if s := store.Size(); s > quota {
			t.Fatalf("store holds %d bytes, quota %d", s, quota)
		}
	}
	for _, f := range files[len(hot):] {
		for _, h := range hot {
			read(h)
		}
		read(f)
	}
	hotEntry, _ := l.Index().Lookup("hot1")
	for _, c := range hotEntry.Chunks {
		if n := mb.covered(c.Offset); n != 1 {
			t.Fatalf("hot chunk at %d fetched %d times", c.Offset, n)
		}
	}
	st := store.Stats()
	if st.Evictions == 0 {
		t.Fatal("nothing was evicted: the test did not fill the store")
	}
	t.Logf("%d origin requests, %d evictions, store %d of %d bytes", mb.requests.Load(), st.Evictions, store.Size(), quota)
}
