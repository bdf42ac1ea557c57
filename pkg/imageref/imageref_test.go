package imageref

import (
	"context"
	"io"
	"log"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/authn"
	ggcrregistry "github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/random"

	"github.com/starling-dev/starling/pkg/registry"
)

func client() *registry.Client {
	return registry.New(registry.DefaultConfig(), registry.WithKeychain(authn.NewMultiKeychain()))
}

// memRegistry serves go-containerregistry's in-memory registry on loopback
// (reached over plain HTTP) and returns its host:port.
func memRegistry(t *testing.T) string {
	t.Helper()
	srv := httptest.NewServer(ggcrregistry.New(ggcrregistry.Logger(log.New(io.Discard, "", 0))))
	t.Cleanup(srv.Close)
	return strings.TrimPrefix(srv.URL, "http://")
}

func TestParse(t *testing.T) {
	c := client()
	for _, tc := range []struct {
		in       string
		dir, tag string
		remote   string
	}{
		{in: "oci:/tmp/x", dir: "/tmp/x"},
		{in: "oci:/tmp/x:v1", dir: "/tmp/x", tag: "v1"},
		{in: "oci:rel/dir:latest", dir: "rel/dir", tag: "latest"},
		{in: "oci:host:5000/dir", dir: "host:5000/dir"}, // the colon is followed by a path: part of the directory
		{in: "localhost:5000/app:1", remote: "localhost:5000/app:1"},
		{in: "alpine", remote: "index.docker.io/library/alpine:latest"},
	} {
		r, err := Parse(tc.in, c)
		if err != nil {
			t.Errorf("%s: %v", tc.in, err)
			continue
		}
		if r.String() != tc.in || r.Dir != tc.dir || r.Tag != tc.tag || r.IsLayout() != (tc.dir != "") {
			t.Errorf("%s: %+v", tc.in, r)
		}
		if tc.remote != "" && (r.Remote == nil || r.Remote.Name() != tc.remote) {
			t.Errorf("%s: remote %v, want %s", tc.in, r.Remote, tc.remote)
		}
	}
	for _, bad := range []string{"oci:", "UPPER/Case:x"} {
		if _, err := Parse(bad, c); err == nil {
			t.Errorf("%q parsed", bad)
		}
	}
}

// randomImages returns an image of two layers and an index of two images.
func randomImages(t *testing.T) (v1.Image, v1.ImageIndex) {
	t.Helper()
	img, err := random.Image(4096, 2)
	if err != nil {
		t.Fatal(err)
	}
	idx, err := random.Index(1024, 1, 2)
	if err != nil {
		t.Fatal(err)
	}
	return img, idx
}

func TestLayoutWriteLoad(t *testing.T) {
	ctx := context.Background()
	c := client()
	dir := filepath.Join(t.TempDir(), "layout")
	img, idx := randomImages(t)
	mustParse := func(s string) Ref {
		r, err := Parse(s, c)
		if err != nil {
			t.Fatal(err)
		}
		return r
	}
	// The layout is created on first write; an untagged write is "latest".
	if err := Write(ctx, c, mustParse("oci:"+dir), img); err != nil {
		t.Fatal(err)
	}
	src, err := Load(ctx, c, mustParse("oci:"+dir))
	if err != nil {
		t.Fatal(err)
	}
	wantDigest, _ := img.Digest()
	if src.Image == nil || src.Index != nil || src.Descriptor.Digest != wantDigest {
		t.Fatalf("only image: %+v", src)
	}
	if err := Write(ctx, c, mustParse("oci:"+dir+":multi"), idx); err != nil {
		t.Fatal(err)
	}
	// Two images now: one must be named.
	if _, err := Load(ctx, c, mustParse("oci:"+dir)); err == nil || !strings.Contains(err.Error(), "holds 2 images") {
		t.Errorf("untagged load of two images: %v", err)
	}
	src, err = Load(ctx, c, mustParse("oci:"+dir+":multi"))
	if err != nil {
		t.Fatal(err)
	}
	if src.Index == nil || src.Image != nil {
		t.Fatalf("index: %+v", src)
	}
	if _, err := Load(ctx, c, mustParse("oci:"+dir+":nope")); err == nil || !strings.Contains(err.Error(), `no image tagged "nope"`) {
		t.Errorf("unknown tag: %v", err)
	}
	// Rewriting a tag replaces it.
	img2, _ := random.Image(2048, 1)
	if err := Write(ctx, c, mustParse("oci:"+dir+":latest"), img2); err != nil {
		t.Fatal(err)
	}
	src, err = Load(ctx, c, mustParse("oci:"+dir+":latest"))
	if err != nil {
		t.Fatal(err)
	}
	if d, _ := img2.Digest(); src.Descriptor.Digest != d {
		t.Errorf("latest is %s, want the rewritten %s", src.Descriptor.Digest, d)
	}
	if _, err := Load(ctx, c, mustParse("oci:"+filepath.Join(t.TempDir(), "missing"))); err == nil {
		t.Error("a missing layout loaded")
	}
	checkBlobReaderAt(t, c, mustParse("oci:"+dir+":latest"), img2)
}

func TestRegistryWriteLoad(t *testing.T) {
	ctx := context.Background()
	c := client()
	host := memRegistry(t)
	img, idx := randomImages(t)
	ref, err := Parse(host+"/app:1", c)
	if err != nil {
		t.Fatal(err)
	}
	if err := Write(ctx, c, ref, img); err != nil {
		t.Fatal(err)
	}
	src, err := Load(ctx, c, ref)
	if err != nil {
		t.Fatal(err)
	}
	if d, _ := img.Digest(); src.Image == nil || src.Descriptor.Digest != d {
		t.Fatalf("image: %+v", src)
	}
	checkBlobReaderAt(t, c, ref, img)

	iref, _ := Parse(host+"/app:multi", c)
	if err := Write(ctx, c, iref, idx); err != nil {
		t.Fatal(err)
	}
	src, err = Load(ctx, c, iref)
	if err != nil {
		t.Fatal(err)
	}
	if d, _ := idx.Digest(); src.Index == nil || src.Descriptor.Digest != d {
		t.Fatalf("index: %+v", src)
	}

	missing, _ := Parse(host+"/app:none", c)
	if _, err := Load(ctx, c, missing); err == nil || !strings.Contains(err.Error(), "resolve "+host+"/app:none") {
		t.Errorf("missing tag: %v", err)
	}
}

// checkBlobReaderAt reads a layer of img at r through BlobReaderAt at an
// offset, and compares.
func checkBlobReaderAt(t *testing.T, c *registry.Client, r Ref, img v1.Image) {
	t.Helper()
	layers, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	l := layers[len(layers)-1]
	h, _ := l.Digest()
	rc, _ := l.Compressed()
	want, _ := io.ReadAll(rc)
	rc.Close()
	ra, closeFn, err := BlobReaderAt(context.Background(), c, r, h)
	if err != nil {
		t.Fatal(err)
	}
	defer closeFn()
	got := make([]byte, 100)
	if _, err := ra.ReadAt(got, 17); err != nil || string(got) != string(want[17:117]) {
		t.Fatalf("%s: ReadAt: %v", r, err)
	}
	if !r.IsLayout() {
		return
	}
	// A read past the end of a file returns what there is and io.EOF.
	n, err := ra.ReadAt(make([]byte, 64), int64(len(want)-10))
	if n != 10 || err != io.EOF {
		t.Errorf("%s: read over the end: %d bytes, %v", r, n, err)
	}
}
