package layer_test

import (
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/starling-dev/starling/internal/testenv"
	"github.com/starling-dev/starling/internal/testimage"
	"github.com/starling-dev/starling/pkg/config"
	"github.com/starling-dev/starling/pkg/registry"
	"github.com/starling-dev/starling/pkg/toc"
)

// TestCorruptChunkIsEIO: a chunk whose bytes do not match its digest (the
// TOC itself intact) gives EIO for that read, after being fetched once more;
// the rest of the layer still reads.
func TestCorruptChunkIsEIO(t *testing.T) {
	testenv.Require(t, "docker-registry", "fusermount3")
	reg := testenv.StartRegistry(t)
	c := registry.New(registry.DefaultConfig())
	img, err := testimage.Large(4<<20, 4)
	if err != nil {
		t.Fatal(err)
	}
	gz, _, conv := pushConverted(t, c, reg.Addr+"/corrupt", img)
	m, _ := conv.Manifest()
	desc := m.Layers[len(m.Layers)-1]
	layers, _ := conv.Layers()
	rc, _ := layers[len(layers)-1].Compressed()
	blob, _ := io.ReadAll(rc)
	rc.Close()

	raw, _, err := toc.Read(bytesAt(blob), int64(len(blob)), new(estargz.GzipDecompressor))
	if err != nil {
		t.Fatal(err)
	}
	var target *estargz.TOCEntry
	for _, e := range raw.Entries {
		if e.Name == "large/f0002" {
			target = e
		}
	}
	if target == nil {
		t.Fatal("no large/f0002 in the TOC")
	}
	// Flip bytes in the middle of the file's first compressed chunk.
	bad := append([]byte(nil), blob...)
	for i := int64(0); i < 64; i++ {
		bad[target.Offset+200+i] ^= 0x5a
	}
	badLayer := static.NewLayer(bad, types.OCILayer)
	if err := c.WriteLayer(context.Background(), gz.Context(), badLayer); err != nil {
		t.Fatal(err)
	}
	desc.Digest, _ = badLayer.Digest()

	fs := config.DefaultFS()
	fs.Prefetch, fs.BackgroundFetch = false, false
	l, dir := mountLayer(t, newManager(t, c, fs), gz.Context(), desc)

	_, err = os.ReadFile(filepath.Join(dir, "large/f0002"))
	if !errors.Is(err, syscall.EIO) {
		t.Fatalf("reading the corrupt chunk: want EIO, got %v", err)
	}
	if st := l.Stats(); st.VerifyFailures < 2 {
		t.Fatalf("chunk not fetched once more before giving up: %+v", st)
	}
	b, err := os.ReadFile(filepath.Join(dir, "large/f0001"))
	if err != nil || string(b) != string(testimage.Random(101, 1<<20)) {
		t.Fatalf("an intact file of the same layer: %v", err)
	}
}

type bytesAt []byte

func (b bytesAt) ReadAt(p []byte, off int64) (int, error) {
	if off >= int64(len(b)) {
		return 0, io.EOF
	}
	n := copy(p, b[off:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}
