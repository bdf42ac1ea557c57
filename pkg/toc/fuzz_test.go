package toc_test

import (
	"archive/tar"
	"bytes"
	"encoding/json"
	"io"
	"testing"

	"github.com/containerd/stargz-snapshotter/estargz"

	"github.com/starling-dev/starling/pkg/toc"
	"github.com/starling-dev/starling/pkg/toc/toctest"
)

// fuzzLimits are small, so that the fuzzer reaches them.
var fuzzLimits = toc.Limits{MaxTOCSize: 1 << 20, MaxEntries: 1 << 12, MaxChunkSize: 1 << 16}

func seedTOCs() [][]byte {
	d := "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
	return [][]byte{
		toctest.TOCJSON(
			&estargz.TOCEntry{Name: "./", Type: "dir", Mode: 0o755},
			&estargz.TOCEntry{Name: "a/b", Type: "reg", Size: 10, ChunkSize: 4, Offset: 10, ChunkDigest: d, Xattrs: map[string][]byte{"user.x": {1, 2}}},
			&estargz.TOCEntry{Name: "a/b", Type: "chunk", ChunkOffset: 4, ChunkSize: 4, Offset: 10, InnerOffset: 4, ChunkDigest: d},
			&estargz.TOCEntry{Name: "a/b", Type: "chunk", ChunkOffset: 8, Offset: 100, ChunkDigest: d},
			&estargz.TOCEntry{Name: "h", Type: "hardlink", LinkName: "a/b"},
			&estargz.TOCEntry{Name: "l", Type: "symlink", LinkName: "a"},
			&estargz.TOCEntry{Name: "dev", Type: "char", DevMajor: 1, DevMinor: 3, ModTime3339: "2020-01-01T00:00:00Z"},
			&estargz.TOCEntry{Name: "a", Type: "dir", Mode: 0o1777, UID: 70000},
			&estargz.TOCEntry{Name: estargz.PrefetchLandmark, Type: "reg", Size: 1, Offset: 200, ChunkDigest: d},
			&estargz.TOCEntry{Name: "e", Type: "reg", Digest: d},
		),
		[]byte(`{"version":1,"entries":[{"name":"big","type":"reg","size":1125899906842624,"chunkSize":1,"offset":1,"chunkDigest":"sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"}]}`),
		[]byte(`{"version":1,"entries":[{"name":"d","type":"dir"},{"name":"h","type":"hardlink","linkName":"d"}]}`),
		[]byte(`{"version":1,"entries":[{"name":"l","type":"symlink","linkName":"/"},{"name":"l/x","type":"dir"}]}`),
		[]byte(`{"version":1,"entries":[null,{"name":"../x","type":"reg"}]}`),
		[]byte(`{"Entries":[{"name":"a","type":"fifo"}],"entries":[]}`),
		[]byte(`null`),
	}
}

func FuzzBuild(f *testing.F) {
	for _, s := range seedTOCs() {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		// The decoded path: a TOC that encoding/json accepts.
		var jt estargz.JTOC
		if json.Unmarshal(data, &jt) == nil {
			ix, err := toc.Build(&jt, 1000, 1100, fuzzLimits)
			if err == nil {
				if err := toctest.Check(ix, fuzzLimits); err != nil {
					t.Fatalf("Build: %v", err)
				}
			}
		}
		// The streaming path of Load, on the same JSON in a gzip blob.
		b := toctest.NewBlob(toctest.Gzip)
		b.Raw(make([]byte, 1000))
		blob, dg := b.Finish(data)
		ix, err := toc.Load(bytes.NewReader(blob), int64(len(blob)), new(estargz.GzipDecompressor), fuzzLimits)
		if err != nil {
			return
		}
		if ix.TOCDigest != dg {
			t.Fatalf("digest %s, want %s", ix.TOCDigest, dg)
		}
		if err := toctest.Check(ix, fuzzLimits); err != nil {
			t.Fatalf("Load: %v", err)
		}
	})
}

func FuzzLoad(f *testing.F) {
	var tb bytes.Buffer
	tw := tar.NewWriter(&tb)
	for _, h := range []*tar.Header{
		{Typeflag: tar.TypeDir, Name: "d/", Mode: 0o755},
		{Typeflag: tar.TypeReg, Name: "d/f", Mode: 0o4755, Size: 300},
		{Typeflag: tar.TypeLink, Name: "h", Linkname: "d/f"},
		{Typeflag: tar.TypeSymlink, Name: "s", Linkname: "d"},
	} {
		tw.WriteHeader(h)
		if h.Size > 0 {
			tw.Write(bytes.Repeat([]byte("0123456789"), int(h.Size/10)))
		}
	}
	tw.Close()
	for _, z := range []bool{false, true} {
		b := buildBlob(f, tb.Bytes(), z, estargz.WithChunkSize(128))
		f.Add(b.blob, z)
		f.Add(buildBlob(f, tb.Bytes(), z, estargz.WithChunkSize(100), estargz.WithMinChunkSize(200)).blob, z)
	}
	for _, c := range toctest.Hostile() {
		if len(c.Blob) < 4096 {
			f.Add(c.Blob, c.Format == toctest.Zstd)
		}
	}
	f.Fuzz(func(t *testing.T, blob []byte, zstdc bool) {
		format := toctest.Gzip
		if zstdc {
			format = toctest.Zstd
		}
		ix, err := toc.Load(bytes.NewReader(blob), int64(len(blob)), format.Decompressor(), fuzzLimits)
		if err != nil {
			return
		}
		if err := toctest.Check(ix, fuzzLimits); err != nil {
			t.Fatal(err)
		}
	})
}

// The first seed is a valid TOC that uses every feature: the fuzzer starts
// from an index, not from a refusal.
func TestFuzzSeedBuilds(t *testing.T) {
	var jt estargz.JTOC
	if err := json.Unmarshal(seedTOCs()[0], &jt); err != nil {
		t.Fatal(err)
	}
	ix, err := toc.Build(&jt, 1000, 1100, fuzzLimits)
	if err != nil {
		t.Fatal(err)
	}
	if err := toctest.Check(ix, fuzzLimits); err != nil {
		t.Fatal(err)
	}
	e, _ := ix.Lookup("a/b")
	h, _ := ix.Lookup("h")
	a, _ := ix.Lookup("a")
	if e != h || e.NumLink != 2 || len(e.Chunks) != 3 || e.Chunks[1].End != 100 || e.Chunks[2].End != 200 || a.Mode != 0o1777 || a.UID != 70000 || ix.Landmark != 200 {
		t.Fatalf("%+v %+v %+v", e, a, ix)
	}
}

var (
	fuzzTypes = []string{"dir", "reg", "chunk", "hardlink", "symlink", "char", "fifo", "reg"}
	fuzzNames = []string{"", ".", "./", "a", "a/", "a/b", "./a/b", "a//b", "a/b/c", "l", "l/x", "h", "d/e/f", "d", "../x", "/a", estargz.PrefetchLandmark, estargz.NoPrefetchLandmark}
)

// FuzzEntries builds TOCs from a small alphabet of names, types, sizes and
// offsets, so that the fuzzer explores the combinations that matter
// (duplicates, implicit directories, hard links, chunk sequences) rather
// than JSON syntax. Whatever Build accepts must hold the invariants and
// look exactly as estargz's reader shows the same TOC.
func FuzzEntries(f *testing.F) {
	f.Add([]byte{0, 3, 0, 0, 0, 0, 1, 5, 0, 30, 10, 1, 2, 5, 0, 0, 0, 2, 3, 11, 5, 0, 0, 0})
	f.Add([]byte{1, 3, 0, 20, 0, 1, 1, 12, 0, 9, 0, 2, 4, 9, 3, 0, 0, 0, 0, 13, 0, 0, 0, 0, 3, 11, 12, 0, 0, 0})
	f.Fuzz(func(t *testing.T, data []byte) {
		const d = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
		var es []*estargz.TOCEntry
		var off, covered int64
		for len(data) >= 6 && len(es) < 64 {
			r := data[:6]
			data = data[6:]
			e := &estargz.TOCEntry{Type: fuzzTypes[r[0]%8], Name: fuzzNames[int(r[1])%len(fuzzNames)], Mode: int64(r[2]) * 0o17}
			switch e.Type {
			case "reg", "chunk":
				if e.Type == "reg" {
					e.Size = int64(r[3] % 40)
					covered = 0
				}
				e.ChunkSize = int64(r[4] % 16)
				e.ChunkOffset = covered
				if r[3]&0x40 != 0 {
					e.ChunkOffset = int64(r[3] % 40)
				}
				covered += e.ChunkSize
				off += int64(r[5]%4) * 10
				if r[5]&0xc0 == 0xc0 {
					off -= 20
				}
				e.Offset = off
				e.InnerOffset = int64(r[5]>>2&3) * 5
				if r[3]&0x80 == 0 {
					e.ChunkDigest = d
				}
			case "hardlink", "symlink":
				e.LinkName = fuzzNames[int(r[3])%len(fuzzNames)]
			case "char":
				e.DevMajor, e.DevMinor = int(r[3]), int(r[4])
			}
			es = append(es, e)
		}
		tocJSON := toctest.TOCJSON(es...)
		b := toctest.NewBlob(toctest.Gzip)
		b.Raw(make([]byte, 1000))
		blob, _ := b.Finish(tocJSON)
		ix, err := toc.Load(bytes.NewReader(blob), int64(len(blob)), new(estargz.GzipDecompressor), fuzzLimits)
		if err != nil {
			return
		}
		if err := toctest.Check(ix, fuzzLimits); err != nil {
			t.Fatal(err)
		}
		r, err := estargz.Open(io.NewSectionReader(bytes.NewReader(blob), 0, int64(len(blob))))
		if err != nil {
			t.Fatalf("accepted, but estargz refuses: %v", err)
		}
		compareWith(t, ix, r, int64(len(blob)), false)
	})
}
