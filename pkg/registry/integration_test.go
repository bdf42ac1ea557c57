package registry_test

import (
	"bytes"
	"context"
	"io"
	"testing"

	"github.com/google/go-containerregistry/pkg/v1/random"

	"github.com/starling-dev/starling/internal/testenv"
	"github.com/starling-dev/starling/pkg/registry"
)

// TestRealRegistry pushes and reads back an image through Debian's
// docker-registry, with a dead mirror in front that must be skipped.
func TestRealRegistry(t *testing.T) {
	reg := testenv.StartRegistry(t)
	cfg := registry.DefaultConfig()
	cfg.Host = map[string]registry.HostConfig{
		reg.Addr: {Mirrors: []registry.Mirror{{Host: "127.0.0.1:1"}}},
	}
	c := registry.New(cfg)
	ctx := context.Background()

	img, err := random.Image(300_000, 2)
	if err != nil {
		t.Fatal(err)
	}
	ref, err := c.ParseReference(reg.Addr + "/test/random:v1")
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Write(ctx, ref, img); err != nil {
		t.Fatalf("push: %v", err)
	}
	got, err := c.Image(ctx, ref, nil)
	if err != nil {
		t.Fatalf("resolve: %v", err)
	}
	wantDigest, _ := img.Digest()
	if d, _ := got.Digest(); d != wantDigest {
		t.Fatalf("manifest digest %s, pushed %s", d, wantDigest)
	}
	layers, _ := img.Layers()
	h, _ := layers[1].Digest()
	rc, _ := layers[1].Compressed()
	whole, _ := io.ReadAll(rc)
	rc.Close()

	part := make([]byte, 1000)
	if _, err := c.NewBlobReaderAt(ctx, ref.Context(), h).ReadAt(part, 5000); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(part, whole[5000:6000]) {
		t.Fatal("range read differs from the blob")
	}
	if n, err := c.BlobSize(ctx, ref.Context(), h); err != nil || n != int64(len(whole)) {
		t.Fatalf("size %d %v, want %d", n, err, len(whole))
	}
	l, err := c.Layer(ctx, ref.Context(), h)
	if err != nil {
		t.Fatal(err)
	}
	rc, err = l.Compressed()
	if err != nil {
		t.Fatal(err)
	}
	all, err := io.ReadAll(rc) // go-containerregistry verifies the digest at EOF
	rc.Close()
	if err != nil || !bytes.Equal(all, whole) {
		t.Fatalf("layer read: %v", err)
	}

	missing, _ := c.ParseReference(reg.Addr + "/test/random:nope")
	if _, err := c.Get(ctx, missing); err == nil {
		t.Fatal("resolving a missing tag succeeded")
	}
}
