package remote

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"os"
	"testing"

	"github.com/containerd/containerd/errdefs"
	"github.com/containerd/containerd/namespaces"
	"github.com/containerd/containerd/snapshots"
	"go.uber.org/goleak"

	"github.com/starling-dev/starling/pkg/snapshot"
)

// TestWithSnapshotter runs the file system under the real snapshotter: every
// layer it resolves ends closed or unmounted, whichever way its snapshot
// ends.
func TestWithSnapshotter(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root for the overlay snapshotter")
	}
	e := newEnv(t, Options{})
	ctx := namespaces.WithNamespace(context.Background(), "test")
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	root := t.TempDir()
	sn, err := snapshot.New(ctx, root, e.fs, log)
	if err != nil {
		t.Fatal(err)
	}
	image := []string{layerA, layerB, layerC}
	prepare := func(key, parent, target string, i int) error {
		labels := criLabels(image[i], image[i:]...)
		labels["containerd.io/snapshot.ref"] = target
		_, err := sn.Prepare(ctx, key, parent, snapshots.WithLabels(labels))
		return err
	}
	e.res.mountErr[layerB] = errors.New("fuse: device busy")
	if err := prepare("x1", "", "chain-a", 0); !errdefs.IsAlreadyExists(err) {
		t.Fatalf("layer A: %v", err)
	}
	// B fails to mount: it falls back, its layer is closed.
	if err := prepare("x2", "chain-a", "chain-b", 1); err != nil {
		t.Fatalf("layer B: %v, want the ordinary path", err)
	}
	if err := sn.Commit(ctx, "chain-b", "x2"); err != nil {
		t.Fatal(err)
	}
	if err := prepare("x3", "chain-b", "chain-c", 2); !errdefs.IsAlreadyExists(err) {
		t.Fatalf("layer C: %v", err)
	}
	if _, err := sn.Prepare(ctx, "container", "chain-c"); err != nil {
		t.Fatal(err)
	}
	if n := e.res.total(); n != 3 {
		t.Errorf("%d resolutions for 3 layers", n)
	}
	if _, closed := e.res.of(layerB)[0].state(); !closed {
		t.Error("layer that failed to mount not closed")
	}
	if err := sn.Remove(ctx, "container"); err != nil {
		t.Fatal(err)
	}
	if err := sn.Remove(ctx, "chain-c"); err != nil {
		t.Fatal(err)
	}
	if at, closed := e.res.of(layerC)[0].state(); at != "" || !closed {
		t.Errorf("removed layer: at %q closed %v", at, closed)
	}
	if err := sn.Close(); err != nil {
		t.Fatal(err)
	}
	if at, closed := e.res.of(layerA)[0].state(); at != "" || !closed {
		t.Errorf("layer after Close: at %q closed %v", at, closed)
	}
	if err := e.fs.Close(); err != nil {
		t.Fatal(err)
	}

	// A new daemon mounts A again from the stored labels.
	e2 := newEnv(t, Options{})
	sn2, err := snapshot.New(ctx, root, e2.fs, log)
	if err != nil {
		t.Fatal(err)
	}
	a := e2.res.of(layerA)
	if len(a) != 1 || a[0].desc.Size != 100 {
		t.Fatalf("layer A after restart: %v", a)
	}
	if at, _ := a[0].state(); at == "" {
		t.Error("layer A not mounted again")
	}
	if err := sn2.Close(); err != nil {
		t.Fatal(err)
	}
	if err := e2.fs.Close(); err != nil {
		t.Fatal(err)
	}
	if _, closed := a[0].state(); !closed {
		t.Error("layer A not closed after the second Close")
	}
	goleak.VerifyNone(t)
}
