package inspect

import (
	"archive/tar"
	"bytes"
	"context"
	"io"
	"maps"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/starling-dev/starling/internal/testimage"
	"github.com/starling-dev/starling/pkg/convert"
)

func sampleLayer() testimage.Layer {
	return testimage.Layer{
		{Name: "bin/", Type: tar.TypeDir, Mode: 0o755},
		{Name: "bin/app", Type: tar.TypeReg, Mode: 0o755, Data: testimage.Random(1, 300<<10)},
		{Name: "etc/", Type: tar.TypeDir, Mode: 0o755},
		{Name: "etc/conf", Type: tar.TypeReg, Mode: 0o644, Data: []byte("key = value\n")},
		{Name: "etc/empty", Type: tar.TypeReg, Mode: 0o644},
		{Name: "lib/", Type: tar.TypeDir, Mode: 0o755},
		{Name: "lib/big", Type: tar.TypeReg, Mode: 0o644, Data: testimage.Random(2, 1<<20)},
	}
}

// layer returns the only layer of img: its descriptor and its bytes.
func layer(t *testing.T, img v1.Image) (v1.Descriptor, []byte) {
	t.Helper()
	m, err := img.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	if len(m.Layers) != 1 {
		t.Fatalf("%d layers", len(m.Layers))
	}
	l, err := img.LayerByDigest(m.Layers[0].Digest)
	if err != nil {
		t.Fatal(err)
	}
	rc, err := l.Compressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	b, err := io.ReadAll(rc)
	if err != nil {
		t.Fatal(err)
	}
	return m.Layers[0], b
}

func convertSample(t *testing.T, o convert.Options) (v1.Descriptor, []byte) {
	t.Helper()
	img, err := testimage.Image(sampleLayer())
	if err != nil {
		t.Fatal(err)
	}
	o.WorkDir = t.TempDir()
	o.ChunkSize = 256 << 10
	c := convert.New(o)
	t.Cleanup(func() { _ = c.Close() })
	out, _, err := c.Image(context.Background(), "sample", img)
	if err != nil {
		t.Fatal(err)
	}
	return layer(t, out)
}

// countingReaderAt counts the bytes read, to show that inspect reads the
// footer and TOC, not the layer.
type countingReaderAt struct {
	r    io.ReaderAt
	read int64
}

func (c *countingReaderAt) ReadAt(p []byte, off int64) (int, error) {
	n, err := c.r.ReadAt(p, off)
	c.read += int64(n)
	return n, err
}

func TestInspectEStargz(t *testing.T) {
	desc, blob := convertSample(t, convert.Options{PrioritizedFiles: []string{"bin/app"}})
	ra := &countingReaderAt{r: bytes.NewReader(blob)}
	l, toc := Inspect(2, desc, ra)
	if l.Format != FormatEStargz || l.Error != "" {
		t.Fatalf("format %s, error %q", l.Format, l.Error)
	}
	if l.Index != 2 || l.Digest != desc.Digest.String() || l.Size != int64(len(blob)) {
		t.Errorf("identity: %+v", l)
	}
	if l.TOCMatch == nil || !*l.TOCMatch || l.TOCDigest == "" || l.TOCDigest != desc.Annotations[convert.TOCDigestAnnotation] {
		t.Errorf("TOC digest %q, annotation %q", l.TOCDigest, l.TOCDigestAnnotation)
	}
	if toc == nil {
		t.Fatal("no TOC returned")
	}
	// 3 dirs, 4 files, the landmark; bin/app is 2 chunks, lib/big 4,
	// etc/conf and the landmark (one byte) 1 each.
	if l.Entries != 8 || l.Chunks != 8 {
		t.Errorf("%d entries, %d chunks; want 8 and 8", l.Entries, l.Chunks)
	}
	if l.Landmark != "prefetch" || l.PrefetchSize <= 0 || l.PrefetchSize >= l.Size {
		t.Errorf("landmark %q at %d of %d bytes", l.Landmark, l.PrefetchSize, l.Size)
	}
	if l.UncompressedSize <= 1<<20 {
		t.Errorf("uncompressed size %d", l.UncompressedSize)
	}
	if ra.read >= l.Size/2 {
		t.Errorf("read %d bytes of a %d-byte layer: more than its footer and TOC", ra.read, l.Size)
	}

	// The manifest's annotation disagrees with the blob.
	bad := desc
	bad.Annotations = maps.Clone(desc.Annotations)
	bad.Annotations[convert.TOCDigestAnnotation] = "sha256:" + string(bytes.Repeat([]byte("0"), 64))
	if l, _ := Inspect(0, bad, bytes.NewReader(blob)); l.TOCMatch == nil || *l.TOCMatch {
		t.Errorf("a wrong annotation matched: %+v", l)
	}
}

func TestInspectZstdChunked(t *testing.T) {
	desc, blob := convertSample(t, convert.Options{ZstdChunked: true})
	l, toc := Inspect(0, desc, bytes.NewReader(blob))
	if l.Format != FormatZstdChunked || toc == nil || l.TOCMatch == nil || !*l.TOCMatch {
		t.Fatalf("%+v", l)
	}
	if l.Landmark != "no-prefetch" {
		t.Errorf("landmark %q: a layer without prioritized files says there is nothing to prefetch", l.Landmark)
	}
}

func TestInspectOtherFormats(t *testing.T) {
	img, err := testimage.Image(sampleLayer())
	if err != nil {
		t.Fatal(err)
	}
	desc, blob := layer(t, img)
	l, toc := Inspect(0, desc, bytes.NewReader(blob))
	if l.Format != FormatGzip || toc != nil || l.TOCMatch != nil || l.UncompressedSize != -1 {
		t.Errorf("plain gzip: %+v", l)
	}

	// A gzip layer that the manifest calls lazy: the blob disagrees.
	lying := desc
	lying.Annotations = map[string]string{convert.TOCDigestAnnotation: "sha256:abc", convert.UncompressedSizeAnnotation: "1234"}
	l, _ = Inspect(0, lying, bytes.NewReader(blob))
	if l.TOCMatch == nil || *l.TOCMatch || l.Error == "" || l.UncompressedSize != 1234 {
		t.Errorf("gzip claiming a TOC: %+v", l)
	}

	for mt, want := range map[types.MediaType]string{
		types.OCIUncompressedLayer:               FormatUncompressed,
		types.DockerForeignLayer:                 FormatOther,
		"application/vnd.example.unknown+binary": FormatOther,
	} {
		d := v1.Descriptor{MediaType: mt, Size: 10, Digest: desc.Digest}
		if l, toc := Inspect(0, d, bytes.NewReader(nil)); l.Format != want || toc != nil {
			t.Errorf("%s: format %s, want %s", mt, l.Format, want)
		}
	}
}
