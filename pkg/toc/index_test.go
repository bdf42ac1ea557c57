package toc_test

import (
	"archive/tar"
	"bytes"
	"errors"
	"fmt"
	"io"
	"math/rand"
	"path"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/containerd/stargz-snapshotter/estargz/zstdchunked"
	"github.com/klauspost/compress/zstd"
	digest "github.com/opencontainers/go-digest"

	"github.com/starling-dev/starling/pkg/toc"
	"github.com/starling-dev/starling/pkg/toc/toctest"
)

type zstdCompression struct {
	*zstdchunked.Compressor
	*zstdchunked.Decompressor
}

// richTar is a layer with every kind of entry and metadata a lazy mount
// must show exactly; contents maps file names to their bytes.
func richTar(t testing.TB, deep int) ([]byte, map[string][]byte) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	contents := map[string][]byte{}
	mt := time.Date(2021, 3, 4, 5, 6, 7, 0, time.UTC)
	rnd := rand.New(rand.NewSource(1))
	random := func(n int) []byte {
		p := make([]byte, n)
		rnd.Read(p)
		return p
	}
	add := func(h *tar.Header, data []byte) {
		t.Helper()
		if h.ModTime.IsZero() {
			h.ModTime = mt
		}
		if h.Typeflag == tar.TypeReg {
			h.Size = int64(len(data))
			contents[h.Name] = data
		}
		h.Format = tar.FormatPAX
		if err := tw.WriteHeader(h); err != nil {
			t.Fatalf("%s: %v", h.Name, err)
		}
		if _, err := tw.Write(data); err != nil {
			t.Fatal(err)
		}
	}
	dir := func(name string, mode int64) {
		add(&tar.Header{Typeflag: tar.TypeDir, Name: name + "/", Mode: mode}, nil)
	}
	reg := func(name string, mode int64, data []byte) {
		add(&tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: mode}, data)
	}
	dir(".", 0o755)
	dir("modes", 0o755)
	for _, m := range []int64{0, 0o4755, 0o2755, 0o1777, 0o400, 0o111, 0o7777, 0o6111} {
		reg(fmt.Sprintf("modes/f%04o", m), m, []byte("x"))
		dir(fmt.Sprintf("modes/d%04o", m), m)
	}
	add(&tar.Header{Typeflag: tar.TypeReg, Name: "owners/big", Mode: 0o644, Uid: 100000, Gid: 4000000000, Uname: "u", Gname: "g"}, []byte("owned"))
	add(&tar.Header{Typeflag: tar.TypeReg, Name: "owners/again", Mode: 0o644, Uid: 100000, Gid: 4000000000}, []byte("owned"))
	add(&tar.Header{Typeflag: tar.TypeReg, Name: "xattrs/cap", Mode: 0o755, PAXRecords: map[string]string{
		"SCHILY.xattr.security.capability": "\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00",
		"SCHILY.xattr.user.note":           "a note",
	}}, []byte("#!/bin/sh\n"))
	add(&tar.Header{Typeflag: tar.TypeDir, Name: "xattrs/opaque/", Mode: 0o755, PAXRecords: map[string]string{"SCHILY.xattr.trusted.overlay.opaque": "y"}}, nil)
	add(&tar.Header{Typeflag: tar.TypeChar, Name: "dev/null", Mode: 0o666, Devmajor: 1, Devminor: 3}, nil)
	add(&tar.Header{Typeflag: tar.TypeBlock, Name: "dev/sda", Mode: 0o660, Devmajor: 259, Devminor: 65537}, nil)
	add(&tar.Header{Typeflag: tar.TypeFifo, Name: "dev/fifo", Mode: 0o600}, nil)
	add(&tar.Header{Typeflag: tar.TypeChar, Name: "dev/.wh.gone", Mode: 0}, nil)
	reg("data/empty", 0o644, nil)
	reg("data/small", 0o644, []byte("small\n"))
	reg("data/large", 0o644, random(300<<10+17))
	reg("data/exact", 0o644, random(64<<10))
	reg("data/zeros", 0o644, make([]byte, 200<<10))
	reg("links/target", 0o640, []byte("linked"))
	add(&tar.Header{Typeflag: tar.TypeLink, Name: "links/sub/hard1", Linkname: "links/target"}, nil)
	add(&tar.Header{Typeflag: tar.TypeLink, Name: "other/hard2", Linkname: "./links/target"}, nil)
	add(&tar.Header{Typeflag: tar.TypeSymlink, Name: "links/sym", Linkname: "../../../etc/passwd"}, nil)
	add(&tar.Header{Typeflag: tar.TypeSymlink, Name: "links/rel", Linkname: "target"}, nil)
	reg("names/with space", 0o644, []byte("space"))
	reg("names/new\nline", 0o644, []byte("newline"))
	reg("names/tab\tand ünïcödé", 0o644, []byte("unicode"))
	reg("names/"+strings.Repeat("n", 255), 0o644, []byte("long name"))
	reg("implicit/x/y/file", 0o644, []byte("implicit parents"))
	add(&tar.Header{Typeflag: tar.TypeReg, Name: "times/epoch", Mode: 0o644, ModTime: time.Unix(0, 0)}, []byte("1970"))
	add(&tar.Header{Typeflag: tar.TypeReg, Name: "times/old", Mode: 0o644, ModTime: time.Date(1901, 1, 1, 0, 0, 0, 0, time.UTC)}, []byte("1901"))
	add(&tar.Header{Typeflag: tar.TypeReg, Name: "times/future", Mode: 0o644, ModTime: time.Date(2400, 1, 1, 0, 0, 0, 0, time.UTC)}, []byte("2400"))
	// A deep tree, deeper than PATH_MAX allows a single path to name.
	p := "deep"
	for i := 0; i < deep; i++ {
		p += "/d"
		dir(p, 0o755)
	}
	reg(p+"/bottom", 0o644, []byte("bottom"))
	// A directory entry that comes after its children.
	reg("late/child", 0o644, []byte("child"))
	dir("late", 0o700)
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes(), contents
}

type built struct {
	blob []byte
	dec  estargz.Decompressor
	tocd digest.Digest
}

func buildBlob(t testing.TB, tarb []byte, zstdc bool, opts ...estargz.Option) built {
	t.Helper()
	var dec estargz.Decompressor = new(estargz.GzipDecompressor)
	if zstdc {
		dec = new(zstdchunked.Decompressor)
		opts = append(opts, estargz.WithCompression(&zstdCompression{&zstdchunked.Compressor{CompressionLevel: zstd.SpeedFastest}, &zstdchunked.Decompressor{}}))
	}
	b, err := estargz.Build(io.NewSectionReader(bytes.NewReader(tarb), 0, int64(len(tarb))), opts...)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	blob, err := io.ReadAll(b)
	if err != nil {
		t.Fatal(err)
	}
	return built{blob: blob, dec: dec, tocd: b.TOCDigest()}
}

func TestIndexMatchesEstargz(t *testing.T) {
	tarb, contents := richTar(t, 2000)
	for _, tc := range []struct {
		name string
		zstd bool
		opts []estargz.Option
	}{
		{"gzip", false, []estargz.Option{estargz.WithChunkSize(64 << 10), estargz.WithCompressionLevel(1), estargz.WithPrioritizedFiles([]string{"modes/f0400", "modes/f0111"})}},
		{"gzip-parallel", false, []estargz.Option{estargz.WithCompressionLevel(1), estargz.WithChunkSize(50000), estargz.WithParallelism(4)}},
		{"gzip-minchunk", false, []estargz.Option{estargz.WithCompressionLevel(1), estargz.WithChunkSize(64 << 10), estargz.WithMinChunkSize(100 << 10)}},
		{"zstd", true, []estargz.Option{estargz.WithChunkSize(64 << 10), estargz.WithPrioritizedFiles([]string{"modes/f4755"})}},
		{"zstd-minchunk", true, []estargz.Option{estargz.WithChunkSize(32 << 10), estargz.WithMinChunkSize(64 << 10), estargz.WithParallelism(3)}},
	} {
		if testing.Short() && tc.name != "gzip" && tc.name != "zstd-minchunk" {
			continue
		}
		t.Run(tc.name, func(t *testing.T) {
			b := buildBlob(t, tarb, tc.zstd, tc.opts...)
			size := int64(len(b.blob))
			ix, err := toc.Load(bytes.NewReader(b.blob), size, b.dec, toc.Limits{})
			if err != nil {
				t.Fatal(err)
			}
			if err := toctest.Check(ix, toc.Limits{}); err != nil {
				t.Fatal(err)
			}
			r, err := estargz.Open(io.NewSectionReader(bytes.NewReader(b.blob), 0, size), estargz.WithDecompressors(b.dec))
			if err != nil {
				t.Fatal(err)
			}
			if ix.TOCDigest != b.tocd || ix.TOCDigest != r.TOCDigest() {
				t.Errorf("TOC digest %s, built %s, estargz %s", ix.TOCDigest, b.tocd, r.TOCDigest())
			}
			compare(t, ix, r, size)
			checkContents(t, ix, b, contents)
			if e, ok := r.Lookup(estargz.PrefetchLandmark); ok {
				if ix.Landmark != e.Offset {
					t.Errorf("landmark %d, estargz %d", ix.Landmark, e.Offset)
				}
			} else if ix.Landmark != -1 {
				t.Errorf("landmark %d, estargz has none", ix.Landmark)
			}
			_, nop := r.Lookup(estargz.NoPrefetchLandmark)
			if ix.NoPrefetch != nop {
				t.Errorf("no-prefetch %v, estargz %v", ix.NoPrefetch, nop)
			}
			inner := 0
			for _, c := range ix.Chunks() {
				if c.Inner > 0 {
					inner++
				}
			}
			if strings.Contains(tc.name, "minchunk") == (inner == 0) {
				t.Errorf("%d chunks inside a shared stream", inner)
			}
			t.Logf("%d chunks inside a shared stream, landmark %d, TOC at %d of %d", inner, ix.Landmark, ix.TOCOffset, size)
			if e, ok := ix.Lookup("names/tab\tand ünïcödé"); !ok || e.Type != "reg" {
				t.Errorf("unicode name: %+v", e)
			}
			if e, ok := ix.Lookup("modes/f0000"); !ok || e.Mode != 0 {
				t.Errorf("mode 0000: %+v", e)
			}
		})
	}
}

// compare walks estargz's tree and checks that the index shows the same.
func compare(t *testing.T, ix *toc.Index, r *estargz.Reader, blobSize int64) {
	t.Helper()
	compareWith(t, ix, r, blobSize, true)
}

// compareWith compares, and with ends, also each chunk's End with
// estargz's NextOffset (which a crafted TOC can make looser than ours).
func compareWith(t *testing.T, ix *toc.Index, r *estargz.Reader, blobSize int64, ends bool) {
	t.Helper()
	type item struct {
		name string
		e    *estargz.TOCEntry
		dir  *toc.Entry // the index's directory holding it
	}
	root, _ := r.Lookup("")
	stack := []item{{"", root, nil}}
	n := 0
	for len(stack) > 0 && !t.Failed() {
		it := stack[len(stack)-1]
		stack = stack[:len(stack)-1]
		n++
		got, ok := ix.Root, true
		if it.dir != nil {
			got, ok = it.dir.Child(path.Base(it.name))
		}
		if !ok {
			t.Errorf("%q: missing", it.name)
			continue
		}
		want := it.e
		mt := want.ModTime()
		if want.ModTime3339 == "" {
			mt = time.Unix(0, 0) // estargz leaves the zero time.Time for the epoch
		}
		if got.Type != want.Type || got.Mode != uint32(want.Mode&0o7777) || got.UID != uint32(want.UID) || got.GID != uint32(want.GID) ||
			!got.ModTime.Equal(mt) || got.LinkName != want.LinkName || got.DevMajor != uint32(want.DevMajor) || got.DevMinor != uint32(want.DevMinor) ||
			fmt.Sprint(got.Xattrs) != fmt.Sprint(want.Xattrs) || (it.name != "" && got.NumLink != uint32(want.NumLink)) {
			t.Errorf("%q:\n got %+v\nwant %+v", it.name, got, want)
		}
		if want.Type == "reg" {
			if got.Size != want.Size || got.Digest != want.Digest {
				t.Errorf("%q: size %d digest %s, want %d %s", it.name, got.Size, got.Digest, want.Size, want.Digest)
			}
			var i int
			for off := int64(0); off < want.Size; i++ {
				ce, ok := r.ChunkEntryForOffset(want.Name, off) // by the link name, estargz misses the chunks of a hard-linked file
				if !ok || i >= len(got.Chunks) {
					t.Fatalf("%q: chunk %d at %d: estargz %v, index has %d", it.name, i, off, ok, len(got.Chunks))
				}
				c := got.Chunks[i]
				end := ce.NextOffset()
				if !ends {
					end = c.End
				} else if end == blobSize {
					end = ix.TOCOffset
				}
				cd := ce.ChunkDigest
				if cd == "" && c.Size == want.Size {
					cd = want.Digest
				}
				if c.FileOffset != ce.ChunkOffset || c.Offset != ce.Offset || c.Inner != ce.InnerOffset || c.Size != ce.ChunkSize || c.Digest != cd || c.End != end {
					t.Errorf("%q: chunk %d: %+v, estargz %+v (next %d)", it.name, i, c, ce, ce.NextOffset())
				}
				if got.ChunkAt(off) != i {
					t.Errorf("%q: ChunkAt(%d) = %d, want %d", it.name, off, got.ChunkAt(off), i)
				}
				off += ce.ChunkSize
			}
			if i != len(got.Chunks) {
				t.Errorf("%q: %d chunks, estargz %d", it.name, len(got.Chunks), i)
			}
		}
		var names []string
		want.ForeachChild(func(base string, c *estargz.TOCEntry) bool {
			names = append(names, base)
			stack = append(stack, item{path.Join(it.name, base), c, got})
			return true
		})
		sort.Strings(names)
		var gotNames []string
		for _, d := range got.Children() {
			gotNames = append(gotNames, d.Name)
		}
		if strings.Join(names, "\x00") != strings.Join(gotNames, "\x00") {
			t.Errorf("%q: children %q, want %q", it.name, gotNames, names)
		}
	}
	t.Logf("%d names compared, %d TOC entries, %d chunks", n, ix.Entries, len(ix.Chunks()))
}

// checkContents reads every file through the index's chunks alone: each
// chunk's stream [Offset, End) decompressed, Inner bytes skipped.
func checkContents(t *testing.T, ix *toc.Index, b built, contents map[string][]byte) {
	t.Helper()
	for name, want := range contents {
		e, ok := ix.Lookup(name)
		if !ok {
			t.Errorf("%q: missing", name)
			continue
		}
		var got []byte
		for _, c := range e.Chunks {
			dr, err := b.dec.Reader(bytes.NewReader(b.blob[c.Offset:c.End]))
			if err != nil {
				t.Fatalf("%q: %v", name, err)
			}
			if _, err := io.CopyN(io.Discard, dr, c.Inner); err != nil {
				t.Fatalf("%q: skip %d: %v", name, c.Inner, err)
			}
			p := make([]byte, c.Size)
			if _, err := io.ReadFull(dr, p); err != nil {
				t.Fatalf("%q: chunk %+v: %v", name, c, err)
			}
			dr.Close()
			if digest.FromBytes(p).String() != c.Digest {
				t.Errorf("%q: chunk at %d does not match its digest", name, c.FileOffset)
			}
			got = append(got, p...)
		}
		if !bytes.Equal(got, want) {
			t.Errorf("%q: content differs (%d bytes, want %d)", name, len(got), len(want))
		}
	}
}

// A tar name that is not UTF-8 reaches the TOC as U+FFFD: the index would
// show another name than overlayfs does, so the layer is refused as lossy.
func TestNotUTF8(t *testing.T) {
	for _, h := range []*tar.Header{
		{Typeflag: tar.TypeReg, Name: "bad\xff\xfename", Mode: 0o644},
		{Typeflag: tar.TypeSymlink, Name: "sym", Linkname: "to\xff"},
		{Typeflag: tar.TypeReg, Name: "x", Mode: 0o644, PAXRecords: map[string]string{"SCHILY.xattr.user.\xff": "v"}},
	} {
		var buf bytes.Buffer
		tw := tar.NewWriter(&buf)
		h.Format = tar.FormatPAX
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		tw.Close()
		for _, z := range []bool{false, true} {
			b := buildBlob(t, buf.Bytes(), z)
			_, err := toc.Load(bytes.NewReader(b.blob), int64(len(b.blob)), b.dec, toc.Limits{})
			if !errors.Is(err, toc.ErrLossy) || !errors.Is(err, toc.ErrInvalid) {
				t.Errorf("%q: %v", h.Name, err)
			}
			t.Log(err)
		}
	}
}
