package chunkcache

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// chunk returns deterministic bytes for chunk i of the given size and
// their digest.
func chunk(i, size int) (string, []byte) {
	b := bytes.Repeat([]byte{byte(i), byte(i >> 8), byte(i >> 16), 0x5a}, size/4+1)[:size]
	copy(b, fmt.Sprintf("chunk-%d-", i))
	sum := sha256.Sum256(b)
	return "sha256:" + hex.EncodeToString(sum[:]), b
}

// onDisk sums what the directory holds: chunk files, and leftovers of writes.
func onDisk(t *testing.T, dir string) (bytes int64, files, temps int) {
	t.Helper()
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() || d.Name() == openMarker {
			return err
		}
		if strings.HasPrefix(d.Name(), ".tmp-") {
			temps++
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		bytes += info.Size()
		files++
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return bytes, files, temps
}

func mustOpen(t testing.TB, dir string, max int64) *Cache {
	t.Helper()
	c, err := Open(dir, max)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func TestPutReadAtGet(t *testing.T) {
	c := mustOpen(t, t.TempDir(), 0)
	d, b := chunk(1, 4000)
	if err := c.Put(d, b); err != nil {
		t.Fatal(err)
	}
	p := make([]byte, 10)
	if n, ok := c.ReadAt(d, p, 3990); !ok || !bytes.Equal(p[:n], b[3990:]) {
		t.Fatalf("ReadAt tail = %q, %v", p[:n], ok)
	}
	if n, ok := c.ReadAt(d, p, 4000); !ok || n != 0 {
		t.Fatalf("ReadAt at end = %d, %v; want 0, true", n, ok)
	}
	if got, ok := c.Get(d); !ok || !bytes.Equal(got, b) {
		t.Fatal("Get did not return the chunk")
	}
	missing, _ := chunk(2, 10)
	if _, ok := c.ReadAt(missing, p, 0); ok {
		t.Fatal("ReadAt of a missing chunk hit")
	}
	for _, bad := range []string{"sha256:../../etc", "sha256:" + strings.Repeat("A", 64), "md5:" + strings.Repeat("a", 64)} {
		if err := c.Put(bad, b); err == nil {
			t.Errorf("Put(%q) accepted", bad)
		}
		if _, ok := c.Get(bad); ok || c.Has(bad) {
			t.Errorf("%q looked up", bad)
		}
	}
	s := c.Stats()
	if s.Hits != 3 || s.Misses < 2 || s.Chunks != 1 || s.Bytes != 4000 || s.Quota != 0 {
		t.Fatalf("Stats = %+v", s)
	}
	if err := c.Remove(d); err != nil || c.Has(d) || c.Size() != 0 {
		t.Fatalf("Remove: err %v, has %v, size %d", err, c.Has(d), c.Size())
	}
}

// The read path uses ReadAt only; its hits must keep chunks alive while a
// stream of cold chunks ten times the quota goes through.
func TestHotSetSurvivesColdFill(t *testing.T) {
	const size, quota, hot = 1024, 64 * 1024, 8
	dir := t.TempDir()
	c := mustOpen(t, dir, quota)
	var hotSet []string
	for i := 0; i < hot; i++ {
		d, b := chunk(i, size)
		if err := c.Put(d, b); err != nil {
			t.Fatal(err)
		}
		hotSet = append(hotSet, d)
	}
	p := make([]byte, 100)
	for i := 0; i < 10*quota/size; i++ {
		d, b := chunk(1000+i, size)
		if err := c.Put(d, b); err != nil {
			t.Fatal(err)
		}
		if i%16 == 0 {
			for _, h := range hotSet {
				if _, ok := c.ReadAt(h, p, 0); !ok {
					t.Fatalf("hot chunk %s evicted after %d cold chunks", h, i)
				}
			}
		}
		if c.Size() > quota {
			t.Fatalf("size %d over quota", c.Size())
		}
	}
	for _, h := range hotSet {
		if !c.Has(h) {
			t.Fatalf("hot chunk %s evicted", h)
		}
	}
	if s := c.Stats(); s.Evictions < 9*quota/size {
		t.Fatalf("only %d evictions", s.Evictions)
	}
	if b, _, _ := onDisk(t, dir); b > quota {
		t.Fatalf("%d bytes on disk over quota", b)
	}
}

// Eight goroutines put and read; the quota holds at every sample, reads
// that hit return the right bytes, and the accounting matches the disk.
func TestQuotaUnderConcurrency(t *testing.T) {
	const quota = 256 * 1024
	dir := t.TempDir()
	c := mustOpen(t, dir, quota)
	var over atomic.Int64
	stop := make(chan struct{})
	var sampler sync.WaitGroup
	sampler.Add(1)
	go func() {
		defer sampler.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			if s := c.Size(); s > quota {
				over.Store(s)
			}
		}
	}()
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			p := make([]byte, 64)
			for i := 0; i < 300; i++ {
				// Chunks 0..63 are shared between goroutines, the rest not.
				id := (g*1000 + i) % 3000
				if i%3 == 0 {
					id = i % 64
				}
				d, b := chunk(id, 1024+id%7*1024)
				if err := c.Put(d, b); err != nil {
					errs <- err
					return
				}
				if s := c.Size(); s > quota {
					over.Store(s)
				}
				for _, back := range []int{0, 1, 5} {
					rid := id - back
					if rid < 0 {
						continue
					}
					rd, rb := chunk(rid, 1024+rid%7*1024)
					if n, ok := c.ReadAt(rd, p, 10); ok && !bytes.Equal(p[:n], rb[10:10+n]) {
						errs <- fmt.Errorf("chunk %d: wrong bytes", rid)
						return
					}
				}
			}
		}(g)
	}
	wg.Wait()
	close(stop)
	sampler.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if s := over.Load(); s != 0 {
		t.Fatalf("size reached %d, over the quota %d", s, quota)
	}
	b, files, temps := onDisk(t, dir)
	s := c.Stats()
	if b > quota || b != s.Bytes || int64(files) != s.Chunks || temps != 0 {
		t.Fatalf("disk %d bytes in %d files (%d temp); stats %+v", b, files, temps, s)
	}
	if s.Evictions == 0 || s.Hits == 0 {
		t.Fatalf("stats %+v: the test did not exercise eviction and hits", s)
	}
}

func TestEvictedBetweenHasAndReadAt(t *testing.T) {
	dir := t.TempDir()
	c := mustOpen(t, dir, 4096)
	d, b := chunk(1, 2048)
	if err := c.Put(d, b); err != nil {
		t.Fatal(err)
	}
	if !c.Has(d) {
		t.Fatal("not stored")
	}
	// Evicted by others' Puts after the caller's lookup.
	for i := 2; i < 6; i++ {
		od, ob := chunk(i, 2048)
		if err := c.Put(od, ob); err != nil {
			t.Fatal(err)
		}
	}
	p := make([]byte, 16)
	if n, ok := c.ReadAt(d, p, 0); ok {
		t.Fatalf("evicted chunk read: %q", p[:n])
	}

	// Deleted behind the cache's back: a miss, dropped from the index, and
	// stored again by the next Put.
	d, b = chunk(7, 1000)
	if err := c.Put(d, b); err != nil {
		t.Fatal(err)
	}
	p1, _ := c.path(d)
	os.Remove(p1)
	if _, ok := c.ReadAt(d, p, 0); ok {
		t.Fatal("deleted chunk read")
	}
	if c.Has(d) {
		t.Fatal("deleted chunk still indexed")
	}
	if err := c.Put(d, b); err != nil {
		t.Fatal(err)
	}
	if n, ok := c.ReadAt(d, p, 0); !ok || !bytes.Equal(p[:n], b[:16]) {
		t.Fatal("chunk stored again not readable")
	}

	// Truncated behind the cache's back (with the descriptor closed, as
	// after a restart): never served short.
	c.Close()
	c = mustOpen(t, dir, 4096)
	os.Truncate(p1, 10)
	if _, ok := c.ReadAt(d, p, 0); ok {
		t.Fatal("truncated chunk read")
	}
	if b, _, _ := onDisk(t, dir); b != c.Size() {
		t.Fatalf("disk %d, size %d", b, c.Size())
	}
}

func TestReopen(t *testing.T) {
	dir := t.TempDir()
	c := mustOpen(t, dir, 9000)
	var ds []string
	base := time.Now().Add(-time.Hour)
	for i := 0; i < 4; i++ {
		d, b := chunk(i, 2000)
		if err := c.Put(d, b); err != nil {
			t.Fatal(err)
		}
		p, _ := c.path(d)
		// Chunk 2 is the oldest, then 0, 1, 3.
		at := base.Add(time.Duration(i) * time.Minute)
		if i == 2 {
			at = base.Add(-time.Minute)
		}
		os.Chtimes(p, at, at)
		ds = append(ds, d)
	}
	c.Close()

	// Leftovers of a crashed write, and files that are not chunks.
	name := strings.TrimPrefix(ds[0], "sha256:")
	strays := []string{
		filepath.Join(dir, name[:2], ".tmp-123"),
		filepath.Join(dir, ".tmp-456"),
		filepath.Join(dir, name[:2], "not-a-digest"),
		filepath.Join(dir, "00", name), // right name, wrong directory
	}
	for _, s := range strays {
		os.MkdirAll(filepath.Dir(s), 0o700)
		if err := os.WriteFile(s, []byte("partial"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	c = mustOpen(t, dir, 9000)
	for _, s := range strays {
		if _, err := os.Stat(s); err == nil {
			t.Errorf("%s left in place", s)
		}
	}
	if s := c.Stats(); s.Chunks != 4 || s.Bytes != 8000 {
		t.Fatalf("rebuilt index: %+v", s)
	}
	// Recency survived: the oldest by mtime goes first (and only it: the
	// low watermark is 8100).
	d, b := chunk(10, 2000)
	if err := c.Put(d, b); err != nil {
		t.Fatal(err)
	}
	if c.Has(ds[2]) || !c.Has(ds[0]) || !c.Has(ds[1]) || !c.Has(ds[3]) {
		t.Fatal("eviction after reopen did not take the oldest chunk")
	}
	c.Close()

	// A smaller quota is met at Open.
	c = mustOpen(t, dir, 5000)
	if c.Size() > 5000 {
		t.Fatalf("size %d over the new quota", c.Size())
	}
	if b, _, _ := onDisk(t, dir); b != c.Size() {
		t.Fatalf("disk %d, size %d", b, c.Size())
	}
}

// A crash (no Close) can leave a recently written chunk torn; the next Open
// checks recent chunks against their names.
func TestReopenAfterCrash(t *testing.T) {
	dir := t.TempDir()
	c, err := Open(dir, 0)
	if err != nil {
		t.Fatal(err)
	}
	good, gb := chunk(1, 3000)
	torn, tb := chunk(2, 3000)
	c.Put(good, gb)
	c.Put(torn, tb)
	p, _ := c.path(torn)
	os.WriteFile(p, make([]byte, 3000), 0o600)
	// No Close: the process died.
	c2 := mustOpen(t, dir, 0)
	if !c2.Has(good) || c2.Has(torn) {
		t.Fatalf("after a crash: good %v, torn %v", c2.Has(good), c2.Has(torn))
	}
	if _, err := os.Stat(p); err == nil {
		t.Fatal("torn chunk left on disk")
	}
}

func TestSameDigestStoredOnce(t *testing.T) {
	dir := t.TempDir()
	c := mustOpen(t, dir, 1<<20)
	d, b := chunk(1, 5000)
	var wg sync.WaitGroup
	for i := 0; i < 8; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := c.Put(d, b); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if err := c.Put(d, b); err != nil {
		t.Fatal(err)
	}
	bytes, files, temps := onDisk(t, dir)
	if files != 1 || temps != 0 || bytes != 5000 || c.Size() != 5000 || c.Stats().Chunks != 1 {
		t.Fatalf("%d files (%d temp), %d bytes on disk; size %d", files, temps, bytes, c.Size())
	}
}

func TestPinned(t *testing.T) {
	dir := t.TempDir()
	c := mustOpen(t, dir, 8192)
	d, b := chunk(1, 2048)
	c.Put(d, b)
	release, ok := c.Pin(d)
	if !ok {
		t.Fatal("Pin of a stored chunk failed")
	}
	for i := 2; i < 40; i++ {
		od, ob := chunk(i, 2048)
		if err := c.Put(od, ob); err != nil {
			t.Fatal(err)
		}
		if c.Size() > 8192 {
			t.Fatalf("size %d over quota", c.Size())
		}
	}
	p := make([]byte, 8)
	if _, ok := c.ReadAt(d, p, 0); !ok {
		t.Fatal("pinned chunk evicted")
	}
	release()
	release() // idempotent
	for i := 40; i < 50; i++ {
		od, ob := chunk(i, 2048)
		c.Put(od, ob)
	}
	if c.Has(d) {
		t.Fatal("chunk not evicted after release")
	}
	if _, ok := c.Pin(d); ok {
		t.Fatal("Pin of a missing chunk succeeded")
	}

	// When everything that would have to go is pinned, Put fails and holds
	// nothing.
	c2 := mustOpen(t, t.TempDir(), 4096)
	a, ab := chunk(100, 4096)
	c2.Put(a, ab)
	rel, _ := c2.Pin(a)
	x, xb := chunk(101, 100)
	if err := c2.Put(x, xb); !errors.Is(err, ErrFull) {
		t.Fatalf("Put over pinned chunks: %v", err)
	}
	if c2.Size() != 4096 || c2.Has(x) {
		t.Fatalf("after a refused Put: size %d", c2.Size())
	}
	// A pinned chunk that is removed is gone for later lookups at once.
	if err := c2.Remove(a); err != nil || c2.Has(a) || c2.Size() != 0 {
		t.Fatal("Remove of a pinned chunk")
	}
	rel()
	if err := c2.Put(x, xb); err != nil {
		t.Fatal(err)
	}
}

func TestTooLarge(t *testing.T) {
	c := mustOpen(t, t.TempDir(), 1000)
	d, b := chunk(1, 1001)
	if err := c.Put(d, b); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("Put of a chunk over the quota: %v", err)
	}
	if c.Size() != 0 {
		t.Fatal("refused chunk counted")
	}
}

func TestWriteFailureLeavesNothing(t *testing.T) {
	dir := t.TempDir()
	c := mustOpen(t, dir, 1<<20)
	keep, kb := chunk(1, 1000)
	c.Put(keep, kb)
	c.write = func(f *os.File, data []byte) (int, error) {
		n, _ := f.Write(data[:len(data)/2])
		return n, &fs.PathError{Op: "write", Path: f.Name(), Err: syscall.ENOSPC}
	}
	d, b := chunk(2, 5000)
	if err := c.Put(d, b); !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("Put on a full disk: %v", err)
	}
	if c.Has(d) || c.Size() != 1000 {
		t.Fatalf("failed Put left has=%v size=%d", c.Has(d), c.Size())
	}
	if bytes, files, temps := onDisk(t, dir); files != 1 || temps != 0 || bytes != 1000 {
		t.Fatalf("disk after failed Put: %d files, %d temp, %d bytes", files, temps, bytes)
	}
}

// Hot chunks keep a descriptor open, up to a bound.
func TestOpenFilesBounded(t *testing.T) {
	c := mustOpen(t, t.TempDir(), 0)
	p := make([]byte, 4)
	for i := 0; i < maxOpenFiles+50; i++ {
		d, b := chunk(i, 16)
		c.Put(d, b)
		if _, ok := c.ReadAt(d, p, 0); !ok {
			t.Fatal("miss")
		}
	}
	c.mu.Lock()
	n := c.fds.Len()
	c.mu.Unlock()
	if n != maxOpenFiles {
		t.Fatalf("%d descriptors open", n)
	}
	c.Close()
	c.mu.Lock()
	n = c.fds.Len()
	c.mu.Unlock()
	if n != 0 {
		t.Fatalf("%d descriptors open after Close", n)
	}
}

// BenchmarkReadAtHit compares a cached read with what the cache did before:
// open, read and close the chunk file on every read.
func BenchmarkReadAtHit(b *testing.B) {
	dir := b.TempDir()
	c := mustOpen(b, dir, 0)
	const n = 64
	var ds []string
	for i := 0; i < n; i++ {
		d, data := chunk(i, 64*1024)
		c.Put(d, data)
		ds = append(ds, d)
	}
	p := make([]byte, 4096)
	b.Run("index", func(b *testing.B) {
		b.SetBytes(int64(len(p)))
		for i := 0; i < b.N; i++ {
			if _, ok := c.ReadAt(ds[i%n], p, 8192); !ok {
				b.Fatal("miss")
			}
		}
	})
	b.Run("open-per-read", func(b *testing.B) {
		b.SetBytes(int64(len(p)))
		for i := 0; i < b.N; i++ {
			path, _ := c.path(ds[i%n])
			if _, err := os.Stat(path); err != nil {
				b.Fatal(err)
			}
			f, err := os.Open(path)
			if err != nil {
				b.Fatal(err)
			}
			f.ReadAt(p, 8192)
			f.Close()
		}
	})
}

func TestPutFileOpenFile(t *testing.T) {
	dir := t.TempDir()
	c := mustOpen(t, dir, 1<<20)
	d, b := chunk(1, 10_000)
	fill := func(w io.Writer) error {
		// In pieces, as assembling a file from its chunks does.
		for off := 0; off < len(b); off += 3000 {
			if _, err := w.Write(b[off:min(off+3000, len(b))]); err != nil {
				return err
			}
		}
		return nil
	}
	if err := c.PutFile(d, int64(len(b)), fill); err != nil {
		t.Fatal(err)
	}
	f, ok := c.OpenFile(d)
	if !ok {
		t.Fatal("OpenFile missed")
	}
	defer f.Close()
	// Removal does not take the bytes from under an open file.
	c.Remove(d)
	got, err := io.ReadAll(f)
	if err != nil || !bytes.Equal(got, b) {
		t.Fatalf("read through OpenFile: %v", err)
	}
	if _, ok := c.OpenFile(d); ok {
		t.Fatal("OpenFile of a removed chunk hit")
	}

	// Bytes that do not match the digest, or the size, never become visible.
	other, _ := chunk(2, 10_000)
	if err := c.PutFile(other, int64(len(b)), fill); err == nil || c.Has(other) {
		t.Fatalf("PutFile of wrong bytes: %v", err)
	}
	if err := c.PutFile(d, int64(len(b))+1, fill); err == nil || c.Has(d) {
		t.Fatalf("PutFile of a wrong size: %v", err)
	}
	if bytes, files, _ := onDisk(t, dir); files != 0 || c.Size() != 0 {
		t.Fatalf("after refused PutFiles: %d files, %d bytes on disk, size %d", files, bytes, c.Size())
	}
}
