package toctest

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"strings"

	"github.com/containerd/stargz-snapshotter/estargz"
	digest "github.com/opencontainers/go-digest"

	"github.com/starling-dev/starling/pkg/toc"
)

// Case is a crafted layer that a reader must refuse, and must survive.
type Case struct {
	Name      string
	Format    Format
	MediaType string
	Blob      []byte
	// TOCDigest is the digest of the TOC JSON, so that a layer's annotation
	// matches and the refusal comes from validation.
	TOCDigest digest.Digest
	// Limits to load with; zero fields are the defaults. Only cases about
	// the limits themselves set them.
	Limits toc.Limits
	// Entry is the name the error must quote ("" when no one entry is at
	// fault); Escapes says the error matches toc.ErrEscapes.
	Entry   string
	Escapes bool
	// Lossy says the error matches toc.ErrLossy: not hostile, but the TOC
	// cannot show the layer exactly (the layer is to be pulled whole).
	Lossy bool
}

// Decompressor is the case's format's decompressor.
func (c Case) Decompressor() estargz.Decompressor { return c.Format.Decompressor() }

// Want checks that err is the refusal the case expects.
func (c Case) Want(err error) error {
	switch {
	case err == nil:
		return fmt.Errorf("%s: accepted", c.Name)
	case !isInvalid(err):
		return fmt.Errorf("%s: error does not match toc.ErrInvalid: %v", c.Name, err)
	case c.Escapes && !isEscapes(err):
		return fmt.Errorf("%s: error does not match toc.ErrEscapes: %v", c.Name, err)
	case c.Lossy && !errors.Is(err, toc.ErrLossy):
		return fmt.Errorf("%s: error does not match toc.ErrLossy: %v", c.Name, err)
	case c.Entry != "" && !namesEntry(err, c.Entry):
		return fmt.Errorf("%s: error does not name the entry %q: %v", c.Name, c.Entry, err)
	}
	return nil
}

func namesEntry(err error, name string) bool {
	var ee *toc.EntryError
	if errors.As(err, &ee) {
		return ee.Name == name && (len(name) > 256 || strings.Contains(err.Error(), fmt.Sprintf("%q", name)))
	}
	return strings.Contains(err.Error(), fmt.Sprintf("%q", name))
}

// content is the payload of crafted files.
var content = []byte("crafted file content\n")

func cdig(p []byte) string { return digest.FromBytes(p).String() }

// Valid is a small well-formed layer (a directory, a file, a symlink and a
// hard link) framed like the hostile ones: it must load.
func Valid(f Format) Case {
	b := NewBlob(f)
	off := b.Stream(content)
	blob, dg := b.Finish(TOCJSON(
		&estargz.TOCEntry{Name: "d/", Type: "dir", Mode: 0o755},
		&estargz.TOCEntry{Name: "d/a", Type: "reg", Mode: 0o644, Size: int64(len(content)), Offset: off, Digest: cdig(content), ChunkDigest: cdig(content)},
		&estargz.TOCEntry{Name: "d/l", Type: "symlink", LinkName: "a"},
		&estargz.TOCEntry{Name: "h", Type: "hardlink", LinkName: "d/a"},
	))
	return Case{Name: "valid-" + f.String(), Format: f, MediaType: f.MediaType(), Blob: blob, TOCDigest: dg}
}

// Hostile returns the corpus of crafted layers, each refused by toc.Load.
func Hostile() []Case {
	var cs []Case
	add := func(f Format, name, entry string, escapes bool, lim toc.Limits, mk func(b *Blob) []byte) {
		b := NewBlob(f)
		blob, dg := b.Finish(mk(b))
		if f == Zstd {
			name = "zstd-" + name
		}
		cs = append(cs, Case{Name: name, Format: f, MediaType: f.MediaType(), Blob: blob, TOCDigest: dg, Limits: lim, Entry: entry, Escapes: escapes})
	}
	reg := func(name string, off int64) *estargz.TOCEntry {
		return &estargz.TOCEntry{Name: name, Type: "reg", Mode: 0o644, Size: int64(len(content)), Offset: off, ChunkDigest: cdig(content)}
	}
	for _, f := range []Format{Gzip, Zstd} {
		add(f, "huge-size-chunksize-1", "big", false, toc.Limits{}, func(b *Blob) []byte {
			off := b.Stream(content)
			return TOCJSON(&estargz.TOCEntry{Name: "big", Type: "reg", Size: 1 << 50, ChunkSize: 1, Offset: off, ChunkDigest: cdig(content[:1])})
		})
		add(f, "hardlink-to-dir", "h", false, toc.Limits{}, func(b *Blob) []byte {
			return TOCJSON(&estargz.TOCEntry{Name: "d", Type: "dir", Mode: 0o755},
				&estargz.TOCEntry{Name: "h", Type: "hardlink", LinkName: "d"})
		})
		add(f, "one-tib-chunk", "huge", false, toc.Limits{}, func(b *Blob) []byte {
			off := b.Stream(content)
			return TOCJSON(&estargz.TOCEntry{Name: "huge", Type: "reg", Size: 1 << 40, Offset: off, ChunkDigest: cdig(content)})
		})
		add(f, "offsets-backwards", "b", false, toc.Limits{}, func(b *Blob) []byte {
			o1 := b.Stream(content)
			o2 := b.Stream(content)
			return TOCJSON(reg("a", o2), reg("b", o1))
		})
		add(f, "toc-over-limit", "", false, toc.Limits{MaxTOCSize: 64 << 10}, func(b *Blob) []byte {
			var es []*estargz.TOCEntry
			prefix := strings.Repeat("p", 200)
			for i := range 2000 {
				es = append(es, &estargz.TOCEntry{Name: fmt.Sprintf("%s/d%06d", prefix, i), Type: "dir", Mode: 0o755})
			}
			return TOCJSON(es...)
		})
		add(f, "inner-4gib", "f", false, toc.Limits{}, func(b *Blob) []byte {
			off := b.Stream(content)
			e := reg("f", off)
			e.InnerOffset = 4 << 30
			return TOCJSON(e)
		})
		add(f, "path-traversal", "../x", true, toc.Limits{}, func(b *Blob) []byte {
			return TOCJSON(reg("../x", b.Stream(content)))
		})
		add(f, "path-traversal-inner", "a/../../x", true, toc.Limits{}, func(b *Blob) []byte {
			return TOCJSON(&estargz.TOCEntry{Name: "a/../../x", Type: "dir"})
		})
		add(f, "absolute-name", "/etc/passwd", true, toc.Limits{}, func(b *Blob) []byte {
			return TOCJSON(reg("/etc/passwd", b.Stream(content)))
		})
		add(f, "under-symlink", "l/passwd", true, toc.Limits{}, func(b *Blob) []byte {
			return TOCJSON(&estargz.TOCEntry{Name: "l", Type: "symlink", LinkName: "/etc"}, reg("l/passwd", b.Stream(content)))
		})
		add(f, "under-symlink-implicit", "l/x/y", true, toc.Limits{}, func(b *Blob) []byte {
			return TOCJSON(&estargz.TOCEntry{Name: "l", Type: "symlink", LinkName: "../../.."}, &estargz.TOCEntry{Name: "l/x/y", Type: "dir"})
		})
		add(f, "hardlink-escape", "h", true, toc.Limits{}, func(b *Blob) []byte {
			return TOCJSON(reg("a", b.Stream(content)), &estargz.TOCEntry{Name: "h", Type: "hardlink", LinkName: "../../etc/passwd"})
		})
		add(f, "hardlink-absolute", "h", true, toc.Limits{}, func(b *Blob) []byte {
			return TOCJSON(&estargz.TOCEntry{Name: "h", Type: "hardlink", LinkName: "/etc/shadow"})
		})
		add(f, "hardlink-missing", "h", false, toc.Limits{}, func(b *Blob) []byte {
			return TOCJSON(&estargz.TOCEntry{Name: "h", Type: "hardlink", LinkName: "nope"})
		})
		add(f, "hardlink-forward", "h", false, toc.Limits{}, func(b *Blob) []byte {
			return TOCJSON(&estargz.TOCEntry{Name: "h", Type: "hardlink", LinkName: "a"}, reg("a", b.Stream(content)))
		})
		add(f, "hardlink-cycle", "a", false, toc.Limits{}, func(b *Blob) []byte {
			return TOCJSON(&estargz.TOCEntry{Name: "a", Type: "hardlink", LinkName: "b"}, &estargz.TOCEntry{Name: "b", Type: "hardlink", LinkName: "a"})
		})
		add(f, "duplicate", "a", false, toc.Limits{}, func(b *Blob) []byte {
			return TOCJSON(reg("a", b.Stream(content)), reg("a", b.Stream(content)))
		})
		add(f, "duplicate-dir", "d/", false, toc.Limits{}, func(b *Blob) []byte {
			return TOCJSON(&estargz.TOCEntry{Name: "d", Type: "dir"}, &estargz.TOCEntry{Name: "d/", Type: "dir"})
		})
		add(f, "file-over-implicit-dir", "a", false, toc.Limits{}, func(b *Blob) []byte {
			return TOCJSON(&estargz.TOCEntry{Name: "a/b", Type: "dir"}, reg("a", b.Stream(content)))
		})
		add(f, "under-file", "a/b", false, toc.Limits{}, func(b *Blob) []byte {
			return TOCJSON(reg("a", b.Stream(content)), &estargz.TOCEntry{Name: "a/b", Type: "dir"})
		})
		add(f, "root-not-dir", "./", false, toc.Limits{}, func(b *Blob) []byte {
			return TOCJSON(&estargz.TOCEntry{Name: "./", Type: "symlink", LinkName: "/"})
		})
		add(f, "chunk-gap", "a", false, toc.Limits{}, func(b *Blob) []byte {
			o1, o2 := b.Stream(content[:8]), b.Stream(content[8:])
			return TOCJSON(&estargz.TOCEntry{Name: "a", Type: "reg", Size: int64(len(content)), ChunkSize: 8, Offset: o1, ChunkDigest: cdig(content[:8])},
				&estargz.TOCEntry{Name: "a", Type: "chunk", ChunkOffset: 9, Offset: o2, ChunkDigest: cdig(content[8:])})
		})
		add(f, "chunks-short", "a", false, toc.Limits{}, func(b *Blob) []byte {
			o1 := b.Stream(content[:8])
			return TOCJSON(&estargz.TOCEntry{Name: "a", Type: "reg", Size: int64(len(content)), ChunkSize: 8, Offset: o1, ChunkDigest: cdig(content[:8])},
				&estargz.TOCEntry{Name: "b", Type: "dir"})
		})
		add(f, "chunk-past-toc", "a", false, toc.Limits{}, func(b *Blob) []byte {
			b.Stream(content)
			return TOCJSON(reg("a", b.Offset()+100))
		})
		add(f, "negative-offset", "a", false, toc.Limits{}, func(b *Blob) []byte {
			return TOCJSON(reg("a", -5))
		})
		add(f, "span-over-limit", "a", false, toc.Limits{MaxChunkSize: 1 << 10}, func(b *Blob) []byte {
			off := b.Stream(content)
			b.Raw(make([]byte, 2<<20))
			return TOCJSON(reg("a", off))
		})
		add(f, "no-chunk-digest", "a", false, toc.Limits{}, func(b *Blob) []byte {
			e := reg("a", b.Stream(content))
			e.ChunkDigest = ""
			return TOCJSON(e)
		})
		add(f, "bad-chunk-digest", "a", false, toc.Limits{}, func(b *Blob) []byte {
			e := reg("a", b.Stream(content))
			e.ChunkDigest = "sha256:zz"
			return TOCJSON(e)
		})
		add(f, "orphan-chunk", "c", false, toc.Limits{}, func(b *Blob) []byte {
			return TOCJSON(&estargz.TOCEntry{Name: "d", Type: "dir"}, &estargz.TOCEntry{Name: "c", Type: "chunk", Offset: b.Stream(content), ChunkDigest: cdig(content)})
		})
		add(f, "negative-size", "a", false, toc.Limits{}, func(b *Blob) []byte {
			e := reg("a", b.Stream(content))
			e.Size = -1
			return TOCJSON(e)
		})
		add(f, "uid-out-of-range", "a", false, toc.Limits{}, func(b *Blob) []byte {
			return TOCJSON(&estargz.TOCEntry{Name: "a", Type: "dir", UID: 1 << 33})
		})
		add(f, "device-out-of-range", "dev", false, toc.Limits{}, func(b *Blob) []byte {
			return TOCJSON(&estargz.TOCEntry{Name: "dev", Type: "char", DevMajor: -1})
		})
		add(f, "unknown-type", "x", false, toc.Limits{}, func(b *Blob) []byte {
			return TOCJSON(&estargz.TOCEntry{Name: "x", Type: "socket"})
		})
		add(f, "nul-in-name", "a\x00b", true, toc.Limits{}, func(b *Blob) []byte {
			return TOCJSON(&estargz.TOCEntry{Name: "a\x00b", Type: "dir"})
		})
		add(f, "too-many-entries", "", false, toc.Limits{MaxEntries: 10}, func(b *Blob) []byte {
			var es []*estargz.TOCEntry
			for i := range 11 {
				es = append(es, &estargz.TOCEntry{Name: fmt.Sprint(i), Type: "dir"})
			}
			return TOCJSON(es...)
		})
		add(f, "name-over-path-max", strings.Repeat("a/", 2100)+"x", false, toc.Limits{}, func(b *Blob) []byte {
			return TOCJSON(&estargz.TOCEntry{Name: strings.Repeat("a/", 2100) + "x", Type: "dir"})
		})
		add(f, "implied-names-over-limit", "d/1/2/3/4/5/6/7/8/9/f", false, toc.Limits{MaxEntries: 10}, func(b *Blob) []byte {
			return TOCJSON(&estargz.TOCEntry{Name: "d/1/2/3/4/5/6/7/8/9/f", Type: "dir"})
		})
		add(f, "implied-dirs-amplified", "", false, toc.Limits{}, func(b *Blob) []byte {
			// Each entry implies 2000 directories: a 4 MB TOC would
			// otherwise cost a million inodes.
			var es []*estargz.TOCEntry
			deep := strings.Repeat("/d", 2000)
			for i := range 10 {
				es = append(es, &estargz.TOCEntry{Name: fmt.Sprint(i) + deep, Type: "dir"})
			}
			return TOCJSON(es...)
		})
		add(f, "name-not-utf8", "bad\ufffdname", false, toc.Limits{}, func(b *Blob) []byte {
			// What estargz's writer makes of the tar name "bad\xffname".
			return TOCJSON(&estargz.TOCEntry{Name: "bad\xffname", Type: "dir"})
		})
		cs[len(cs)-1].Lossy = true
		add(f, "null-toc", "", false, toc.Limits{}, func(b *Blob) []byte { return []byte("null") })
		add(f, "null-entry", "", false, toc.Limits{}, func(b *Blob) []byte { return []byte(`{"version":1,"entries":[null]}`) })
		add(f, "trailing-data", "", false, toc.Limits{}, func(b *Blob) []byte { return []byte(`{"version":1,"entries":[]} {"entries":[]}`) })
	}
	// A footer whose gzip extra field is shorter than its subfield claims:
	// estargz's footer parser panics on it.
	{
		b := NewBlob(Gzip)
		blob, dg := b.Finish(TOCJSON())
		foot := estargz.CreateGzipFooter([]byte{'S', 'G', 22, 0, '0'})
		foot = append(foot, make([]byte, estargz.FooterSize-len(foot))...)
		blob = append(blob[:len(blob)-estargz.FooterSize], foot...)
		cs = append(cs, Case{Name: "footer-short-extra", Format: Gzip, MediaType: Gzip.MediaType(), Blob: blob, TOCDigest: dg})
	}
	// A footer naming a TOC past the end of the blob.
	for _, f := range []Format{Gzip, Zstd} {
		b := NewBlob(f)
		blob, dg := b.Finish(TOCJSON())
		if f == Zstd {
			foot := blob[len(blob)-40:]
			foot[0] = 0xff
			foot[7] = 0x7f
		} else {
			blob = append(blob[:len(blob)-estargz.FooterSize], GzipFooter(1<<40)...)
		}
		cs = append(cs, Case{Name: "footer-out-of-blob-" + f.String(), Format: f, MediaType: f.MediaType(), Blob: blob, TOCDigest: dg})
	}
	return cs
}

// HugeTOC is a layer whose TOC JSON, valid but padded with whitespace,
// is size bytes and compresses to almost nothing: a reader must stop
// decompressing it at its limit.
func HugeTOC(f Format, size int64) Case {
	const pad = 1 << 16
	head, tail := `{"version":1,"entries":[`, "]}"
	entry := func(i int) string { return fmt.Sprintf(`{"name":"d%09d","type":"dir"}`, i) }
	per := int64(len(entry(0))+1) + pad // entry, comma, padding
	n := int((size - int64(len(head)+len(tail))) / per)
	if n < 1 {
		n = 1
	}
	total := int64(len(head)+len(tail)) + int64(n)*per - 1 // no comma after the last
	spaces := bytes.Repeat([]byte{' '}, pad)
	b := NewBlob(f)
	dg := digest.Canonical.Digester()
	blob, err := b.FinishStream(total, func(w io.Writer) error {
		w = io.MultiWriter(w, dg.Hash())
		io.WriteString(w, head)
		for i := range n {
			if i > 0 {
				io.WriteString(w, ",")
			}
			w.Write(spaces)
			io.WriteString(w, entry(i))
		}
		_, err := io.WriteString(w, tail)
		return err
	})
	if err != nil {
		panic(err)
	}
	return Case{Name: fmt.Sprintf("huge-toc-%d-%s", total, f), Format: f, MediaType: f.MediaType(), Blob: blob, TOCDigest: dg.Digest()}
}
