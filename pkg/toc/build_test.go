package toc_test

import (
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/containerd/stargz-snapshotter/estargz"

	"github.com/starling-dev/starling/pkg/toc"
	"github.com/starling-dev/starling/pkg/toc/toctest"
)

const emptyDigest = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"

func TestBuildEdges(t *testing.T) {
	if _, err := toc.Build(nil, 0, 0, toc.Limits{}); !errors.Is(err, toc.ErrInvalid) {
		t.Errorf("nil TOC: %v", err)
	}
	if _, err := toc.Build(&estargz.JTOC{}, 10, 5, toc.Limits{}); !errors.Is(err, toc.ErrInvalid) {
		t.Errorf("TOC past the blob: %v", err)
	}
	ix, err := toc.Build(&estargz.JTOC{}, 0, 0, toc.Limits{})
	if err != nil || ix.Root.Type != "dir" || ix.Root.Mode != 0o755 || ix.Root.NumLink != 2 || ix.Landmark != -1 || len(ix.Chunks()) != 0 {
		t.Fatalf("empty TOC: %+v, %v", ix, err)
	}
	ix, err = toc.Build(&estargz.JTOC{Entries: []*estargz.TOCEntry{
		{Name: "./", Type: "dir", Mode: 0o700, UID: 5},
		{Name: "./a/b", Type: "reg", Size: 30, ChunkSize: 10, Offset: 10, ChunkDigest: emptyDigest},
		{Name: "ignored", Type: "chunk", ChunkOffset: 10, ChunkSize: 10, Offset: 20, ChunkDigest: emptyDigest},
		{Type: "chunk", ChunkOffset: 20, Offset: 20, InnerOffset: 10, ChunkDigest: emptyDigest},
		{Name: "a", Type: "dir", Mode: 0o750},
		{Name: "e", Type: "reg", Offset: 5},                                  // empty: its offset means nothing
		{Name: "a/c", Type: "reg", Size: 3, Offset: 40, Digest: emptyDigest}, // no chunk digest: the file's
	}}, 50, 60, toc.Limits{})
	if err != nil {
		t.Fatal(err)
	}
	if err := toctest.Check(ix, toc.Limits{}); err != nil {
		t.Fatal(err)
	}
	if ix.Root.Mode != 0o700 || ix.Root.UID != 5 || ix.Entries != 7 {
		t.Errorf("root %+v, %d entries", ix.Root, ix.Entries)
	}
	for _, n := range []string{"a/b", "./a/b", "/a/b", "a/b/", "a//b"} {
		if e, ok := ix.Lookup(n); !ok || e.Name != "a/b" {
			t.Errorf("Lookup(%q) = %+v, %v", n, e, ok)
		}
	}
	for _, n := range []string{"a/x", "a/b/c", "x", "e/x"} {
		if _, ok := ix.Lookup(n); ok {
			t.Errorf("Lookup(%q) found", n)
		}
	}
	a, _ := ix.Lookup("a")
	if a.Mode != 0o750 || len(a.Children()) != 2 || a.Children()[0].Name != "b" || a.Children()[1].Name != "c" {
		t.Errorf("a: %+v", a)
	}
	b, _ := ix.Lookup("a/b")
	want := []toc.Chunk{
		{FileOffset: 0, Offset: 10, End: 20, Inner: 0, Size: 10, Digest: emptyDigest},
		{FileOffset: 10, Offset: 20, End: 40, Inner: 0, Size: 10, Digest: emptyDigest},
		{FileOffset: 20, Offset: 20, End: 40, Inner: 10, Size: 10, Digest: emptyDigest},
	}
	if fmt.Sprint(b.Chunks) != fmt.Sprint(want) {
		t.Errorf("chunks\n got %+v\nwant %+v", b.Chunks, want)
	}
	for off, i := range map[int64]int{-1: -1, 0: 0, 9: 0, 10: 1, 19: 1, 20: 2, 29: 2, 30: -1} {
		if got := b.ChunkAt(off); got != i {
			t.Errorf("ChunkAt(%d) = %d, want %d", off, got, i)
		}
	}
	c, _ := ix.Lookup("a/c")
	if len(c.Chunks) != 1 || c.Chunks[0].End != 50 || c.Chunks[0].Digest != emptyDigest {
		t.Errorf("a/c: %+v", c.Chunks)
	}
	if e, _ := ix.Lookup("e"); len(e.Chunks) != 0 || e.Size != 0 {
		t.Errorf("e: %+v", e)
	}
	if got := ix.Chunks(); len(got) != 4 || got[3].Offset != 40 {
		t.Errorf("Chunks() = %+v", got)
	}
}

// TestConcurrentReads is for -race: an index is read-only once built.
func TestConcurrentReads(t *testing.T) {
	c := toctest.Valid(toctest.Zstd)
	ix, err := loadCase(c)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for range 200 {
				if err := toctest.Check(ix, toc.Limits{}); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
}

// TestBuildScales builds a wide and a deep TOC at sizes a real layer
// reaches; the work is O(n log n), so this stays well under a second.
func TestBuildScales(t *testing.T) {
	n := 200000
	if testing.Short() {
		n = 20000
	}
	var es []*estargz.TOCEntry
	off := int64(0)
	for i := range n {
		es = append(es, &estargz.TOCEntry{Name: fmt.Sprintf("dir%03d/file%07d", i%1000, i), Type: "reg", Size: 100, Offset: off, ChunkDigest: emptyDigest})
		off += 50
	}
	deep := ""
	for range 2000 {
		deep += "d/"
		es = append(es, &estargz.TOCEntry{Name: deep, Type: "dir"})
	}
	for i := range 2000 {
		es = append(es, &estargz.TOCEntry{Name: fmt.Sprintf("%sf%d", deep, i), Type: "fifo"})
	}
	start := time.Now()
	ix, err := toc.Build(&estargz.JTOC{Entries: es}, off, off+100, toc.Limits{})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%d entries in %v", len(es), time.Since(start))
	if e, ok := ix.Lookup(deep + "f1999"); !ok || e.Type != "fifo" {
		t.Fatal("deep entry missing")
	}
	if got := len(ix.Chunks()); got != n {
		t.Fatalf("%d chunks, want %d", got, n)
	}
}

func loadCase(c toctest.Case) (*toc.Index, error) {
	return toc.Load(bytesReader(c.Blob), int64(len(c.Blob)), c.Decompressor(), c.Limits)
}
