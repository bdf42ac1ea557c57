package layer_test

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/starling-dev/starling/internal/testenv"
	"github.com/starling-dev/starling/internal/testimage"
	"github.com/starling-dev/starling/internal/treediff"
	"github.com/starling-dev/starling/pkg/config"
	"github.com/starling-dev/starling/pkg/convert"
	"github.com/starling-dev/starling/pkg/layer"
	"github.com/starling-dev/starling/pkg/registry"
)

// pushConverted pushes img as gzip under :gz and its eStargz conversion under :esgz.
func pushConverted(t *testing.T, c *registry.Client, repo string, img v1.Image) (gz, esgz name.Reference, conv v1.Image) {
	t.Helper()
	ctx := context.Background()
	gz, _ = c.ParseReference(repo + ":gz")
	esgz, _ = c.ParseReference(repo + ":esgz")
	if err := c.Write(ctx, gz, img); err != nil {
		t.Fatal(err)
	}
	cv := convert.New(convert.Options{WorkDir: t.TempDir(), ChunkSize: 512 << 10})
	t.Cleanup(func() { _ = cv.Close() })
	conv, _, err := cv.Image(ctx, repo, img)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Write(ctx, esgz, conv); err != nil {
		t.Fatal(err)
	}
	return gz, esgz, conv
}

func newManager(t *testing.T, c *registry.Client, fs config.FS) *layer.Manager {
	t.Helper()
	return manager(t, layer.Options{Root: t.TempDir(), Registry: c, FS: fs})
}

// manager makes a Manager that is closed when the test ends.
func manager(t *testing.T, o layer.Options) *layer.Manager {
	t.Helper()
	m, err := layer.NewManager(o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := m.Close(); err != nil {
			t.Error(err)
		}
	})
	return m
}

// mountAll mounts every layer of img lazily and returns the mountpoints, lowest first.
func mountAll(t *testing.T, m *layer.Manager, repo name.Repository, img v1.Image) ([]string, []*layer.Layer) {
	t.Helper()
	mf, err := img.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	var dirs []string
	var layers []*layer.Layer
	for _, d := range mf.Layers {
		l, dir := mountLayer(t, m, repo, d)
		dirs = append(dirs, dir)
		layers = append(layers, l)
	}
	return dirs, layers
}

// TestLazyTreeEqualsUnpacked: the overlay of the lazily mounted layers of
// the hard-case image equals what containerd's overlayfs unpacks from the
// original image, path by path.
func TestLazyTreeEqualsUnpacked(t *testing.T) {
	testenv.Require(t, "docker-registry", "containerd", "fusermount3")
	reg := testenv.StartRegistry(t)
	ctd := testenv.StartContainerd(t, testenv.ContainerdOptions{})
	c := registry.New(registry.DefaultConfig())
	img, err := testimage.HardCases()
	if err != nil {
		t.Fatal(err)
	}
	gz, _, conv := pushConverted(t, c, reg.Addr+"/hard", img)

	fs := config.DefaultFS()
	fs.Prefetch, fs.BackgroundFetch = false, false
	dirs, _ := mountAll(t, newManager(t, c, fs), gz.Context(), conv)
	lower := make([]string, len(dirs))
	for i, d := range dirs {
		lower[len(dirs)-1-i] = d
	}
	merged := t.TempDir()
	testenv.Run(t, "mount", "-t", "overlay", "overlay", "-o", "ro,lowerdir="+strings.Join(lower, ":"), merged)
	t.Cleanup(func() { testenv.Run(t, "umount", merged) })
	lazy, err := treediff.Snapshot(merged)
	if err != nil {
		t.Fatal(err)
	}

	ctx := context.Background()
	if out, err := ctd.Ctr(ctx, "image", "pull", "--plain-http", gz.String()); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	ref := t.TempDir()
	if out, err := ctd.Ctr(ctx, "image", "mount", gz.String(), ref); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	t.Cleanup(func() { _, _ = ctd.Ctr(ctx, "image", "unmount", "--rm", ref) })
	want, err := treediff.Snapshot(ref)
	if err != nil {
		t.Fatal(err)
	}
	if d := treediff.Diff(want, lazy); len(d) > 0 {
		t.Fatalf("lazy tree differs from the unpacked one (%d):\n%s", len(d), strings.Join(d, "\n"))
	}
	if _, ok := lazy["opaque/old"]; ok {
		t.Fatal("opaque directory leaks the lower layer")
	}
}

// TestReadsFetchLittle: reading a few small files of a large layer fetches
// a small share of it when prefetch and background fetch are off.
func TestReadsFetchLittle(t *testing.T) {
	testenv.Require(t, "docker-registry", "fusermount3")
	reg := testenv.StartRegistry(t)
	c := registry.New(registry.DefaultConfig())
	img, err := testimage.Large(100<<20, 100)
	if err != nil {
		t.Fatal(err)
	}
	gz, _, conv := pushConverted(t, c, reg.Addr+"/large", img)
	fs := config.DefaultFS()
	fs.Prefetch, fs.BackgroundFetch = false, false
	dirs, layers := mountAll(t, newManager(t, c, fs), gz.Context(), conv)
	top := dirs[len(dirs)-1]
	for _, f := range []string{"small/s0000", "small/s0008", "small/s0040"} {
		b, err := os.ReadFile(filepath.Join(top, f))
		if err != nil || !strings.HasPrefix(string(b), "small file") {
			t.Fatalf("read %s: %q %v", f, b, err)
		}
	}
	mf, _ := conv.Manifest()
	size := mf.Layers[len(mf.Layers)-1].Size
	st := layers[len(layers)-1].Stats()
	t.Logf("fetched %d of %d bytes (%.2f%%) in %d requests", st.FetchedBytes, size, 100*float64(st.FetchedBytes)/float64(size), st.FetchRequests)
	if st.FetchedBytes*10 >= size {
		t.Fatalf("fetched %d of %d bytes", st.FetchedBytes, size)
	}
	// A whole large file reads back right.
	want := testimage.Random(100+3, (100<<20)/100)
	got, err := os.ReadFile(filepath.Join(top, "large/f0003"))
	if err != nil || string(got) != string(want) {
		t.Fatalf("large/f0003: %d bytes, err %v, equal %v", len(got), err, string(got) == string(want))
	}
}
