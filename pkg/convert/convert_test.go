package convert

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
	"testing"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/containerd/stargz-snapshotter/estargz/zstdchunked"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/opencontainers/go-digest"

	"github.com/starling-dev/starling/internal/testimage"
)

func convertHard(t *testing.T, opts Options) (v1.Image, *ImageResult) {
	t.Helper()
	if _, err := os.Stat("/bin/busybox"); err != nil {
		t.Skip("needs /bin/busybox (busybox-static)")
	}
	img, err := testimage.HardCases()
	if err != nil {
		t.Fatal(err)
	}
	opts.WorkDir = t.TempDir()
	c := New(opts)
	t.Cleanup(func() { _ = c.Close() })
	out, res, err := c.Image(context.Background(), "hard", img)
	if err != nil {
		t.Fatal(err)
	}
	return out, res
}

// verifyWithReference opens every layer with the reference estargz reader,
// checks its TOC against the annotation and reads every file through the
// chunk verifiers.
func verifyWithReference(t *testing.T, img v1.Image, zstd bool) {
	t.Helper()
	m, err := img.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	layers, _ := img.Layers()
	cfg, _ := img.ConfigFile()
	for i, l := range layers {
		rc, err := l.Compressed()
		if err != nil {
			t.Fatal(err)
		}
		b, err := io.ReadAll(rc)
		rc.Close()
		if err != nil {
			t.Fatal(err)
		}
		sr := io.NewSectionReader(bytesReaderAt(b), 0, int64(len(b)))
		var opts []estargz.OpenOption
		if zstd {
			opts = append(opts, estargz.WithDecompressors(new(zstdchunked.Decompressor)))
		}
		r, err := estargz.Open(sr, opts...)
		if err != nil {
			t.Fatalf("layer %d: reference reader refuses it: %v", i, err)
		}
		want := m.Layers[i].Annotations[TOCDigestAnnotation]
		tocDgst, err := digest.Parse(want)
		if err != nil {
			t.Fatalf("layer %d: annotation %q: %v", i, want, err)
		}
		v, err := r.VerifyTOC(tocDgst)
		if err != nil {
			t.Fatalf("layer %d: TOC does not verify: %v", i, err)
		}
		root, ok := r.Lookup("")
		if !ok {
			t.Fatalf("layer %d: no root", i)
		}
		files := 0
		var walk func(e *estargz.TOCEntry)
		walk = func(e *estargz.TOCEntry) {
			e.ForeachChild(func(_ string, c *estargz.TOCEntry) bool {
				if c.Type == "dir" {
					walk(c)
				} else if c.Type == "reg" && c.Size > 0 {
					files++
					readVerified(t, r, v, c)
				}
				return true
			})
		}
		walk(root)
		if files == 0 {
			t.Fatalf("layer %d: no files read", i)
		}
		// The diff ID in the config is the digest of the uncompressed layer.
		dr, err := l.Uncompressed()
		if err != nil {
			t.Fatal(err)
		}
		h := sha256.New()
		if _, err := io.Copy(h, dr); err != nil {
			t.Fatal(err)
		}
		dr.Close()
		if got := fmt.Sprintf("sha256:%x", h.Sum(nil)); got != cfg.RootFS.DiffIDs[i].String() {
			t.Fatalf("layer %d: diff ID %s, uncompressed digest %s", i, cfg.RootFS.DiffIDs[i], got)
		}
	}
}

func readVerified(t *testing.T, r *estargz.Reader, v estargz.TOCEntryVerifier, e *estargz.TOCEntry) {
	t.Helper()
	name := e.Name
	for off := int64(0); off < e.Size; {
		ce, ok := r.ChunkEntryForOffset(name, off)
		if !ok {
			t.Fatalf("%s: no chunk at %d", name, off)
		}
		sr, err := r.OpenFile(name)
		if err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, ce.ChunkSize)
		if _, err := sr.ReadAt(buf, ce.ChunkOffset); err != nil && err != io.EOF {
			t.Fatalf("%s: read chunk at %d: %v", name, ce.ChunkOffset, err)
		}
		dv, err := v.Verifier(ce)
		if err != nil {
			t.Fatalf("%s: verifier: %v", name, err)
		}
		if _, err := dv.Write(buf); err != nil {
			t.Fatal(err)
		}
		if !dv.Verified() {
			t.Fatalf("%s: chunk at %d does not match its digest", name, ce.ChunkOffset)
		}
		off = ce.ChunkOffset + ce.ChunkSize
	}
}

type bytesReaderAt []byte

func (b bytesReaderAt) ReadAt(p []byte, off int64) (int, error) {
	if off >= int64(len(b)) {
		return 0, io.EOF
	}
	n := copy(p, b[off:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func TestConvertVerifiesWithReferenceReader(t *testing.T) {
	img, res := convertHard(t, Options{ChunkSize: 1 << 20})
	for _, l := range res.Layers {
		if l.Kept || l.TOCDigest == "" || l.UncompressedSize <= 0 {
			t.Fatalf("layer result %+v", l)
		}
	}
	verifyWithReference(t, img, false)
}

func TestConvertZstdChunked(t *testing.T) {
	img, res := convertHard(t, Options{ZstdChunked: true})
	m, _ := img.Manifest()
	for i, l := range m.Layers {
		if l.MediaType != types.OCILayerZStd || l.Annotations[zstdchunked.ManifestChecksumAnnotation] == "" {
			t.Fatalf("layer %d: %s %v", i, l.MediaType, l.Annotations)
		}
	}
	if len(res.Layers) != 4 {
		t.Fatalf("%d layers", len(res.Layers))
	}
	verifyWithReference(t, img, true)
}

func TestConvertIsDeterministic(t *testing.T) {
	a, _ := convertHard(t, Options{})
	b, _ := convertHard(t, Options{Jobs: 1})
	da, _ := a.Digest()
	db, _ := b.Digest()
	if da != db {
		t.Fatalf("two conversions of one image differ: %s and %s", da, db)
	}
}

func TestAlreadyEStargzIsKept(t *testing.T) {
	once, _ := convertHard(t, Options{})
	c := New(Options{WorkDir: t.TempDir()})
	defer c.Close()
	twice, res, err := c.Image(context.Background(), "again", once)
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range res.Layers {
		if !l.Kept {
			t.Fatalf("layer %d rebuilt: %+v", l.Index, l)
		}
	}
	d1, _ := once.Digest()
	d2, _ := twice.Digest()
	if d1 != d2 {
		t.Fatalf("converting an eStargz image changed it: %s -> %s", d1, d2)
	}
}

func TestPrioritizedFilesComeFirst(t *testing.T) {
	img, res := convertHard(t, Options{PrioritizedFiles: []string{"bin/busybox", "bin/sh"}})
	if res.Layers[0].Kept {
		t.Fatal("kept")
	}
	layers, _ := img.Layers()
	rc, _ := layers[0].Compressed()
	b, _ := io.ReadAll(rc)
	rc.Close()
	r, err := estargz.Open(io.NewSectionReader(bytesReaderAt(b), 0, int64(len(b))))
	if err != nil {
		t.Fatal(err)
	}
	lm, ok := r.Lookup(estargz.PrefetchLandmark)
	if !ok {
		t.Fatal("no prefetch landmark in the layer with prioritized files")
	}
	bb, _ := r.Lookup("bin/busybox")
	if bb.Offset >= lm.Offset {
		t.Fatalf("busybox at %d, after the landmark at %d", bb.Offset, lm.Offset)
	}
}

// TestNonUTF8LayerLeftAsItWas: a layer with a name, link target or xattr
// name that is not UTF-8 cannot have a TOC that names it exactly, so it is
// left as it came (and will be unpacked, not mounted lazily), with a warning
// naming layer and entry; the other layers of the image are converted.
func TestNonUTF8LayerLeftAsItWas(t *testing.T) {
	plain := testimage.Layer{{Name: "ok/", Type: tar.TypeDir, Mode: 0o755}, {Name: "ok/f", Type: tar.TypeReg, Mode: 0o644, Data: []byte("fine\n")}}
	target := testimage.Layer{{Name: "l", Type: tar.TypeSymlink, Mode: 0o777, Link: "caf\xe9"}}
	xattr := testimage.Layer{{Name: "x", Type: tar.TypeReg, Mode: 0o644, Data: []byte("x"), Xattrs: map[string]string{"user.\xff": "v"}}}
	img, err := testimage.Image(plain, testimage.NonUTF8Layer(), target, xattr)
	if err != nil {
		t.Fatal(err)
	}
	srcM, _ := img.Manifest()
	srcCfg, _ := img.ConfigFile()
	for _, zstd := range []bool{false, true} {
		var logBuf bytes.Buffer
		c := New(Options{WorkDir: t.TempDir(), ZstdChunked: zstd, Logger: slog.New(slog.NewTextHandler(&logBuf, nil))})
		out, res, err := c.Image(context.Background(), "nonutf8", img)
		if err != nil {
			t.Fatal(err)
		}
		m, _ := out.Manifest()
		cfg, _ := out.ConfigFile()
		if res.Layers[0].NotLazy != "" || m.Layers[0].Annotations[TOCDigestAnnotation] == "" {
			t.Errorf("zstd %v: the UTF-8 layer was not converted: %+v", zstd, res.Layers[0])
		}
		for i, want := range map[int]string{1: `entry "nonutf8/latin1-caf\xe9": name is not UTF-8`, 2: `link target "caf\xe9" is not UTF-8`, 3: `xattr name "user.\xff" is not UTF-8`} {
			l := res.Layers[i]
			if !strings.Contains(l.NotLazy, want) {
				t.Errorf("zstd %v layer %d: reason %q, want %q", zstd, i, l.NotLazy, want)
			}
			if l.Digest != srcM.Layers[i].Digest || m.Layers[i].Digest != srcM.Layers[i].Digest || m.Layers[i].MediaType != types.OCILayer {
				t.Errorf("zstd %v layer %d: not the original: %+v, manifest %+v", zstd, i, l, m.Layers[i])
			}
			if _, ok := m.Layers[i].Annotations[TOCDigestAnnotation]; ok {
				t.Errorf("zstd %v layer %d: a TOC annotation on a layer without TOC", zstd, i)
			}
			if cfg.RootFS.DiffIDs[i] != srcCfg.RootFS.DiffIDs[i] {
				t.Errorf("zstd %v layer %d: diff ID %s, source %s", zstd, i, cfg.RootFS.DiffIDs[i], srcCfg.RootFS.DiffIDs[i])
			}
			if !strings.Contains(logBuf.String(), srcM.Layers[i].Digest.String()) {
				t.Errorf("zstd %v layer %d: no warning naming it:\n%s", zstd, i, logBuf.String())
			}
		}
		if !strings.Contains(logBuf.String(), "level=WARN") || !strings.Contains(logBuf.String(), `latin1-caf\\xe9`) {
			t.Errorf("zstd %v: warning does not name the entry:\n%s", zstd, logBuf.String())
		}
		_ = c.Close()
	}
}

// TestNonUTF8EStargzLosesTOCAnnotation: a layer that is eStargz already but
// whose TOC mangled a name is not kept as a lazy layer: it keeps its bytes
// and loses the annotations that would make it mount lazily.
func TestNonUTF8EStargzLosesTOCAnnotation(t *testing.T) {
	tb, err := testimage.NonUTF8Layer().Tar()
	if err != nil {
		t.Fatal(err)
	}
	blob, err := estargz.Build(io.NewSectionReader(bytes.NewReader(tb), 0, int64(len(tb))))
	if err != nil {
		t.Fatal(err)
	}
	esgz, err := io.ReadAll(blob)
	if err != nil {
		t.Fatal(err)
	}
	blob.Close()
	l, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(esgz)), nil }, tarball.WithMediaType(types.OCILayer))
	if err != nil {
		t.Fatal(err)
	}
	img, err := mutate.Append(empty.Image, mutate.Addendum{Layer: l, MediaType: types.OCILayer,
		Annotations: map[string]string{TOCDigestAnnotation: blob.TOCDigest().String(), "keep.me": "yes"}})
	if err != nil {
		t.Fatal(err)
	}
	c := New(Options{WorkDir: t.TempDir(), Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	defer c.Close()
	out, res, err := c.Image(context.Background(), "esgz-nonutf8", img)
	if err != nil {
		t.Fatal(err)
	}
	m, _ := out.Manifest()
	if res.Layers[0].Kept || res.Layers[0].NotLazy == "" {
		t.Fatalf("layer result %+v", res.Layers[0])
	}
	if a := m.Layers[0].Annotations; a[TOCDigestAnnotation] != "" || a["keep.me"] != "yes" {
		t.Fatalf("annotations %v", a)
	}
}
