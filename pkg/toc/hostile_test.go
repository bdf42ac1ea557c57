package toc_test

import (
	"bytes"
	"errors"
	"runtime"
	"testing"

	"github.com/starling-dev/starling/pkg/toc"
	"github.com/starling-dev/starling/pkg/toc/toctest"
)

func TestValidCrafted(t *testing.T) {
	for _, f := range []toctest.Format{toctest.Gzip, toctest.Zstd} {
		c := toctest.Valid(f)
		ix, err := toc.Load(bytes.NewReader(c.Blob), int64(len(c.Blob)), c.Decompressor(), c.Limits)
		if err != nil {
			t.Fatalf("%s: %v", c.Name, err)
		}
		if ix.TOCDigest != c.TOCDigest {
			t.Errorf("%s: digest %s, want %s", c.Name, ix.TOCDigest, c.TOCDigest)
		}
		if err := toctest.Check(ix, c.Limits); err != nil {
			t.Errorf("%s: %v", c.Name, err)
		}
		a, ok := ix.Lookup("d/a")
		h, ok2 := ix.Lookup("h")
		if !ok || !ok2 || a != h || a.NumLink != 2 {
			t.Errorf("%s: hardlink not resolved: %+v %+v", c.Name, a, h)
		}
	}
}

func TestHostile(t *testing.T) {
	for _, c := range toctest.Hostile() {
		t.Run(c.Name, func(t *testing.T) {
			ix, err := toc.Load(bytes.NewReader(c.Blob), int64(len(c.Blob)), c.Decompressor(), c.Limits)
			if werr := c.Want(err); werr != nil {
				t.Fatal(werr)
			}
			if ix != nil {
				t.Fatal("an index along with an error")
			}
			t.Logf("%v", err)
		})
	}
}

func TestHugeTOC(t *testing.T) {
	size := int64(toc.DefaultMaxTOCSize + 1<<20)
	lim := toc.Limits{}
	if testing.Short() {
		size, lim = 2<<20, toc.Limits{MaxTOCSize: 1 << 20}
	}
	for _, f := range []toctest.Format{toctest.Gzip, toctest.Zstd} {
		c := toctest.HugeTOC(f, size)
		t.Logf("%s: %d byte blob", c.Name, len(c.Blob))
		_, err := toc.Load(bytes.NewReader(c.Blob), int64(len(c.Blob)), c.Decompressor(), lim)
		if !errors.Is(err, toc.ErrInvalid) {
			t.Fatalf("%s: %v", c.Name, err)
		}
		t.Logf("%v", err)
		// Under the limit, the same kind of TOC loads.
		small := toctest.HugeTOC(f, 1<<20)
		ix, err := toc.Load(bytes.NewReader(small.Blob), int64(len(small.Blob)), small.Decompressor(), toc.Limits{})
		if err != nil {
			t.Fatalf("%s: %v", small.Name, err)
		}
		if ix.TOCDigest != small.TOCDigest {
			t.Errorf("%s: digest %s, want %s", small.Name, ix.TOCDigest, small.TOCDigest)
		}
	}
}

func bytesReader(p []byte) *bytes.Reader { return bytes.NewReader(p) }

type countingReaderAt struct {
	r     *bytes.Reader
	calls int
}

func (c *countingReaderAt) ReadAt(p []byte, off int64) (int, error) {
	c.calls++
	return c.r.ReadAt(p, off)
}

// Load reads the footer and then the TOC: two ranged reads, never more.
func TestLoadReads(t *testing.T) {
	for _, f := range []toctest.Format{toctest.Gzip, toctest.Zstd} {
		c := toctest.Valid(f)
		ra := &countingReaderAt{r: bytes.NewReader(c.Blob)}
		if _, err := toc.Load(ra, int64(len(c.Blob)), c.Decompressor(), toc.Limits{}); err != nil {
			t.Fatal(err)
		}
		if ra.calls != 2 {
			t.Errorf("%s: %d reads", f, ra.calls)
		}
	}
}

// Refusing a TOC costs in proportion to the TOC, never to the sizes it
// claims: a terabyte file or a 2^50 byte file of one-byte chunks is
// refused without allocating for it.
func TestHostileCheap(t *testing.T) {
	for _, c := range toctest.Hostile() {
		if c.Name != "huge-size-chunksize-1" && c.Name != "one-tib-chunk" && c.Name != "inner-4gib" && c.Name != "hardlink-to-dir" {
			continue
		}
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		_, err := loadCase(c)
		runtime.ReadMemStats(&after)
		if err == nil {
			t.Fatalf("%s: accepted", c.Name)
		}
		if n := after.TotalAlloc - before.TotalAlloc; n > 4<<20 {
			t.Errorf("%s: %d bytes allocated to refuse a %d byte blob", c.Name, n, len(c.Blob))
		}
	}
}
