package convert_test

import (
	"context"
	"os"
	"strings"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/starling-dev/starling/internal/testenv"
	"github.com/starling-dev/starling/internal/testimage"
	"github.com/starling-dev/starling/pkg/registry"
)

func imageWith(t *testing.T, layers ...v1.Layer) v1.Image {
	t.Helper()
	bb, err := testimage.BusyboxLayer()
	if err != nil {
		t.Fatal(err)
	}
	base, err := testimage.Image(bb)
	if err != nil {
		t.Fatal(err)
	}
	img, err := mutate.AppendLayers(base, layers...)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

func TestBadInput(t *testing.T) {
	testenv.Require(t, "docker-registry")
	reg := testenv.StartRegistry(t)
	starling := testenv.Bin(t, "starling")
	c := registry.New(registry.DefaultConfig())
	ctx := context.Background()

	noManifest := func(t *testing.T, ref string) {
		t.Helper()
		r, _ := c.ParseReference(ref)
		if _, err := c.Head(ctx, r); err == nil {
			t.Fatalf("a manifest was left at %s", ref)
		}
	}

	t.Run("unknown reference", func(t *testing.T) {
		src := reg.Addr + "/nothing:here"
		msg := runFail(t, starling, "convert", src, reg.Addr+"/out:unknown")
		if !strings.Contains(msg, src) {
			t.Fatalf("error does not name the image: %s", msg)
		}
		noManifest(t, reg.Addr+"/out:unknown")
	})

	t.Run("corrupt gzip layer", func(t *testing.T) {
		bad := static.NewLayer([]byte("\x1f\x8b\x08\x00 this is not a gzip stream at all"), types.OCILayer)
		src := reg.Addr + "/corrupt:gz"
		push(t, src, imageWith(t, bad))
		d, _ := bad.Digest()
		msg := runFail(t, starling, "convert", src, reg.Addr+"/out:corrupt")
		if !strings.Contains(msg, src) || !strings.Contains(msg, d.String()) || !strings.Contains(msg, "layer 2/2") {
			t.Fatalf("error does not name image and layer: %s", msg)
		}
		noManifest(t, reg.Addr+"/out:corrupt")
	})

	t.Run("digest mismatch", func(t *testing.T) {
		img, err := testimage.Large(200_000, 2)
		if err != nil {
			t.Fatal(err)
		}
		src := reg.Addr + "/tampered:gz"
		push(t, src, img)
		layers, _ := img.Layers()
		d, _ := layers[1].Digest()
		// Change the stored bytes behind the registry's back.
		p := blobDataPath(reg, d)
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		b[len(b)/2] ^= 0xff
		if err := os.WriteFile(p, b, 0o644); err != nil {
			t.Fatal(err)
		}
		msg := runFail(t, starling, "convert", src, reg.Addr+"/out:tampered")
		if !strings.Contains(msg, src) || !strings.Contains(msg, d.String()) {
			t.Fatalf("error does not name image and layer: %s", msg)
		}
		noManifest(t, reg.Addr+"/out:tampered")
	})

	t.Run("unsupported media type", func(t *testing.T) {
		odd := static.NewLayer([]byte("whatever"), "application/vnd.example.custom.layer")
		src := reg.Addr + "/odd:1"
		push(t, src, imageWith(t, odd))
		d, _ := odd.Digest()
		msg := runFail(t, starling, "convert", src, reg.Addr+"/out:odd")
		if !strings.Contains(msg, src) || !strings.Contains(msg, d.String()) || !strings.Contains(msg, "unsupported") {
			t.Fatalf("error does not name image, layer and cause: %s", msg)
		}
		noManifest(t, reg.Addr+"/out:odd")
	})

	t.Run("unreachable registry", func(t *testing.T) {
		src := "127.0.0.1:1/gone:1"
		msg := runFail(t, starling, "convert", src, reg.Addr+"/out:unreachable")
		if !strings.Contains(msg, src) {
			t.Fatalf("error does not name the image: %s", msg)
		}
		noManifest(t, reg.Addr+"/out:unreachable")
	})

}
