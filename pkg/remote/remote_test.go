package remote

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containerd/containerd/pkg/snapshotters"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	ggcr "github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"go.uber.org/goleak"

	"github.com/starling-dev/starling/pkg/layer"
	"github.com/starling-dev/starling/pkg/snapshot"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

func digest(c byte) string { return "sha256:" + strings.Repeat(string(c), 64) }

var (
	layerA   = digest('a')
	layerB   = digest('b')
	layerC   = digest('c')
	manifest = digest('1')
	tocLabel = digest('2')
)

// fakeRegistry serves one manifest and blob sizes, and counts requests.
type fakeRegistry struct {
	mu        sync.Mutex
	manifests map[string][]byte // digest -> manifest
	gets      int
	sizes     int
	getErr    error
	getGate   chan struct{} // when set, Get waits for it
}

func newFakeRegistry(t *testing.T, layers ...v1.Descriptor) *fakeRegistry {
	m := v1.Manifest{SchemaVersion: 2, MediaType: types.OCIManifestSchema1,
		Config: v1.Descriptor{MediaType: types.OCIConfigJSON, Digest: mustHash(digest('9')), Size: 10},
		Layers: layers}
	b, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	return &fakeRegistry{manifests: map[string][]byte{manifest: b}}
}

func (r *fakeRegistry) ParseReference(s string) (name.Reference, error) {
	return name.ParseReference(s)
}

func (r *fakeRegistry) Get(ctx context.Context, ref name.Reference, _ ...ggcr.Option) (*ggcr.Descriptor, error) {
	r.mu.Lock()
	r.gets++
	gate, err := r.getGate, r.getErr
	b, ok := r.manifests[ref.Identifier()]
	r.mu.Unlock()
	if gate != nil {
		select {
		case <-gate:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	if err != nil {
		return nil, err
	}
	if !ok {
		return nil, fmt.Errorf("manifest %s: not found", ref)
	}
	return &ggcr.Descriptor{Manifest: b}, nil
}

func (r *fakeRegistry) BlobSize(ctx context.Context, repo name.Repository, h v1.Hash) (int64, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.sizes++
	return 4242, nil
}

func (r *fakeRegistry) count() (gets, sizes int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.gets, r.sizes
}

// fakeLayer runs a "background fetch" goroutine until it is closed, as
// pkg/layer's layers do, so a leak shows in goleak.
type fakeLayer struct {
	desc v1.Descriptor
	repo name.Repository

	mu        sync.Mutex
	mountedAt string
	mounts    int
	closed    bool
	mountErr  error
	stop      chan struct{}
	stopped   chan struct{}
}

func (l *fakeLayer) Mount(dir string) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return errors.New("closed")
	}
	if l.mountErr != nil {
		return l.mountErr
	}
	if l.mountedAt != "" {
		return errors.New("already mounted")
	}
	l.mountedAt = dir
	l.mounts++
	return nil
}

func (l *fakeLayer) Unmount() error {
	l.mu.Lock()
	l.mountedAt = ""
	l.mu.Unlock()
	l.Close()
	return nil
}

func (l *fakeLayer) Close() {
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.closed {
		l.closed = true
		close(l.stop)
		<-l.stopped
	}
}

func (l *fakeLayer) state() (mountedAt string, closed bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.mountedAt, l.closed
}

// errPanic makes the fake resolver panic, as a hostile layer might.
var errPanic = errors.New("panic")

// fakeResolver resolves fake layers and keeps every one it made.
type fakeResolver struct {
	mu       sync.Mutex
	layers   []*fakeLayer
	fail     map[string]error // layer digest -> error
	mountErr map[string]error
	gate     chan struct{} // when set, Resolve waits for it
	resolved chan string   // told each digest resolved, when set
}

func newFakeResolver() *fakeResolver {
	return &fakeResolver{fail: map[string]error{}, mountErr: map[string]error{}}
}

func (r *fakeResolver) Resolve(ctx context.Context, repo name.Repository, desc v1.Descriptor) (*fakeLayer, error) {
	r.mu.Lock()
	gate := r.gate
	r.mu.Unlock()
	if gate != nil {
		select {
		case <-gate:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.resolved != nil {
		defer func() { r.resolved <- desc.Digest.String() }()
	}
	if err := r.fail[desc.Digest.String()]; err != nil {
		if err == errPanic {
			panic("makeslice: len out of range")
		}
		return nil, err
	}
	l := &fakeLayer{desc: desc, repo: repo, mountErr: r.mountErr[desc.Digest.String()],
		stop: make(chan struct{}), stopped: make(chan struct{})}
	go func() {
		defer close(l.stopped)
		<-l.stop
	}()
	r.layers = append(r.layers, l)
	return l, nil
}

// of returns the layers resolved for a digest.
func (r *fakeResolver) of(d string) []*fakeLayer {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []*fakeLayer
	for _, l := range r.layers {
		if l.desc.Digest.String() == d {
			out = append(out, l)
		}
	}
	return out
}

func (r *fakeResolver) total() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.layers)
}

func mustHash(s string) v1.Hash {
	h, err := v1.NewHash(s)
	if err != nil {
		panic(err)
	}
	return h
}

func lazyDesc(d string, size int64) v1.Descriptor {
	return v1.Descriptor{MediaType: types.OCILayer, Digest: mustHash(d), Size: size,
		Annotations: map[string]string{TOCDigestLabel: digest('7'), "other": "x"}}
}

func criLabels(layerDigest string, image ...string) map[string]string {
	l := map[string]string{
		"containerd.io/snapshot.ref":           "chain-" + layerDigest[7:15],
		snapshotters.TargetRefLabel:            "registry.test/app:1",
		snapshotters.TargetLayerDigestLabel:    layerDigest,
		snapshotters.TargetManifestDigestLabel: manifest,
		TOCDigestLabel:                         tocLabel,
		"containerd.io/snapshot/cri.unrelated": "x",
	}
	if len(image) > 0 {
		l[snapshotters.TargetImageLayersLabel] = strings.Join(image, ",")
	}
	return l
}

type env struct {
	t   *testing.T
	ctx context.Context
	reg *fakeRegistry
	res *fakeResolver
	fs  *FS
}

func newEnv(t *testing.T, o Options, layers ...v1.Descriptor) *env {
	t.Helper()
	if len(layers) == 0 {
		layers = []v1.Descriptor{lazyDesc(layerA, 100), lazyDesc(layerB, 200), lazyDesc(layerC, 300)}
	}
	e := &env{t: t, ctx: context.Background(), reg: newFakeRegistry(t, layers...), res: newFakeResolver()}
	e.fs = New(e.reg, e.res, o)
	e.fs.checkMount = func(string) error { return nil }
	t.Cleanup(func() { _ = e.fs.Close() })
	return e
}

// prepare does what the snapshotter does for a remote layer.
func (e *env) prepare(dir string, labels map[string]string) error {
	if err := e.fs.Resolve(e.ctx, labels); err != nil {
		return err
	}
	return e.fs.Mount(e.ctx, dir, labels)
}

func TestLabelsToDescriptor(t *testing.T) {
	e := newEnv(t, Options{})
	if err := e.prepare("/mnt/a", criLabels(layerB)); err != nil {
		t.Fatal(err)
	}
	ls := e.res.of(layerB)
	if len(ls) != 1 {
		t.Fatalf("%d resolutions of layer B", len(ls))
	}
	l := ls[0]
	if l.repo.String() != "registry.test/app" {
		t.Errorf("repository %s", l.repo)
	}
	if l.desc.Size != 200 || l.desc.MediaType != types.OCILayer || l.desc.Annotations["other"] != "x" {
		t.Errorf("descriptor %+v not the manifest's", l.desc)
	}
	// The label is what containerd vouches for; it wins over the manifest.
	if got := l.desc.Annotations[TOCDigestLabel]; got != tocLabel {
		t.Errorf("TOC digest %s, want the label's %s", got, tocLabel)
	}
	if at, _ := l.state(); at != "/mnt/a" {
		t.Errorf("mounted at %q", at)
	}

	// Without a manifest digest: the size from the registry.
	labels := criLabels(layerC)
	delete(labels, snapshotters.TargetManifestDigestLabel)
	if err := e.prepare("/mnt/c", labels); err != nil {
		t.Fatal(err)
	}
	c := e.res.of(layerC)[0]
	if _, sizes := e.reg.count(); sizes != 1 || c.desc.Size != 4242 || c.desc.Annotations[TOCDigestLabel] != tocLabel {
		t.Errorf("descriptor %+v (%d size requests)", c.desc, sizes)
	}
}

func TestMissingLabels(t *testing.T) {
	e := newEnv(t, Options{})
	for _, drop := range []string{snapshotters.TargetRefLabel, snapshotters.TargetLayerDigestLabel, TOCDigestLabel} {
		labels := criLabels(layerA)
		delete(labels, drop)
		if err := e.fs.Resolve(e.ctx, labels); !errors.Is(err, snapshot.ErrNotRemote) {
			t.Errorf("Resolve without %s: %v, want ErrNotRemote", drop, err)
		}
		if err := e.fs.Mount(e.ctx, "/mnt/a", labels); !errors.Is(err, snapshot.ErrNotRemote) {
			t.Errorf("Mount without %s: %v, want ErrNotRemote", drop, err)
		}
	}
	if gets, _ := e.reg.count(); gets != 0 || e.res.total() != 0 {
		t.Errorf("a layer without labels cost %d manifest requests and %d resolutions", gets, e.res.total())
	}
}

func TestManifestFetchedOnce(t *testing.T) {
	e := newEnv(t, Options{})
	gate := make(chan struct{})
	e.reg.getGate = gate
	var wg sync.WaitGroup
	errs := make(chan error, 3)
	for i, d := range []string{layerA, layerB, layerC} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs <- e.prepare(fmt.Sprintf("/mnt/%d", i), criLabels(d))
		}()
	}
	time.Sleep(50 * time.Millisecond)
	close(gate)
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	if gets, _ := e.reg.count(); gets != 1 {
		t.Errorf("manifest fetched %d times for 3 layers, want once", gets)
	}
	// And later layers of the same image find it still.
	if err := e.prepare("/mnt/again", criLabels(layerA)); err != nil {
		t.Fatal(err)
	}
	if gets, _ := e.reg.count(); gets != 1 {
		t.Errorf("manifest fetched %d times, want once", gets)
	}
}

func TestSiblingsResolvedAhead(t *testing.T) {
	e := newEnv(t, Options{})
	image := []string{layerA, layerB, layerC}
	if err := e.fs.Resolve(e.ctx, criLabels(layerA, image...)); err != nil {
		t.Fatal(err)
	}
	// B and C are on their way before containerd prepares them.
	waitFor(t, func() bool { return e.res.total() == 3 })
	for i, d := range image {
		// containerd prepares each layer with the labels for it: the image's
		// layers from it up.
		if i > 0 {
			if err := e.fs.Resolve(e.ctx, criLabels(d, image[i:]...)); err != nil {
				t.Fatal(err)
			}
		}
		if err := e.fs.Mount(e.ctx, "/mnt/"+d[7:8], criLabels(d, image[i:]...)); err != nil {
			t.Fatal(err)
		}
	}
	if n := e.res.total(); n != 3 {
		t.Errorf("%d resolutions for 3 layers resolved ahead, want 3", n)
	}
	for _, d := range image {
		l := e.res.of(d)[0]
		if at, closed := l.state(); at == "" || closed {
			t.Errorf("layer %s: mounted at %q, closed %v", d, at, closed)
		}
	}
}

func TestUnusedSiblingsClosedWhenImageDone(t *testing.T) {
	e := newEnv(t, Options{})
	image := []string{layerA, layerB, layerC}
	if err := e.prepare("/mnt/a", criLabels(layerA, image...)); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool { return e.res.total() == 3 })
	// B is never prepared (say, containerd had it already); C, the top
	// layer, ends the image's prepare.
	if err := e.prepare("/mnt/c", criLabels(layerC, layerC)); err != nil {
		t.Fatal(err)
	}
	b := e.res.of(layerB)[0]
	waitFor(t, func() bool { _, closed := b.state(); return closed })
	if at, _ := b.state(); at != "" {
		t.Errorf("unused layer mounted at %s", at)
	}
}

func TestUnusedSiblingsClosedAfterTTL(t *testing.T) {
	e := newEnv(t, Options{PendingTTL: 50 * time.Millisecond})
	image := []string{layerA, layerB, layerC}
	if err := e.prepare("/mnt/a", criLabels(layerA, image...)); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool { return e.res.total() == 3 })
	for _, d := range []string{layerB, layerC} {
		l := e.res.of(d)[0]
		waitFor(t, func() bool { _, closed := l.state(); return closed })
	}
	if _, closed := e.res.of(layerA)[0].state(); closed {
		t.Error("the mounted layer was closed")
	}
	// A prepare that comes late resolves the layer again.
	if err := e.prepare("/mnt/b", criLabels(layerB, layerB, layerC)); err != nil {
		t.Fatal(err)
	}
	if n := len(e.res.of(layerB)); n != 2 {
		t.Errorf("%d resolutions of B, want 2", n)
	}
}

func TestSiblingNotLazy(t *testing.T) {
	plain := lazyDesc(layerB, 200)
	plain.Annotations = nil
	e := newEnv(t, Options{}, lazyDesc(layerA, 100), plain, lazyDesc(layerC, 300))
	image := []string{layerA, layerB, layerC}
	if err := e.prepare("/mnt/a", criLabels(layerA, image...)); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool { return len(e.res.of(layerC)) == 1 })
	// B has no TOC: never resolved. Its prepare (with no TOC label either)
	// falls back.
	labels := criLabels(layerB, layerB, layerC)
	delete(labels, TOCDigestLabel)
	if err := e.fs.Resolve(e.ctx, labels); !errors.Is(err, snapshot.ErrNotRemote) {
		t.Errorf("not lazy layer: %v", err)
	}
	if n := len(e.res.of(layerB)); n != 0 {
		t.Errorf("layer without TOC resolved %d times", n)
	}
}

func TestErrorsNameLayer(t *testing.T) {
	e := newEnv(t, Options{})
	e.res.fail[layerA] = errors.New("read TOC: unexpected EOF")
	err := e.prepare("/mnt/a", criLabels(layerA))
	if err == nil || !strings.Contains(err.Error(), layerA) || !strings.Contains(err.Error(), "unexpected EOF") {
		t.Errorf("resolve failure: %v", err)
	}
	e.res.fail[layerB] = fmt.Errorf("layer %s: %w: media type x", layerB, layer.ErrNotLazy)
	err = e.prepare("/mnt/b", criLabels(layerB))
	if !errors.Is(err, snapshot.ErrNotRemote) || strings.Count(err.Error(), layerB) != 1 {
		t.Errorf("not lazy layer: %v (want ErrNotRemote, layer named once)", err)
	}
	err = e.prepare("/mnt/d", criLabels(digest('d')))
	if err == nil || !strings.Contains(err.Error(), digest('d')) || !strings.Contains(err.Error(), "not in manifest") {
		t.Errorf("layer missing from its manifest: %v", err)
	}
	e.reg.getErr = errors.New("401 unauthorized")
	e.fs.mu.Lock()
	e.fs.manifests = map[string]*manifestCall{}
	e.fs.mu.Unlock()
	err = e.prepare("/mnt/c", criLabels(layerC))
	if err == nil || !strings.Contains(err.Error(), layerC) || !strings.Contains(err.Error(), "401") {
		t.Errorf("manifest failure: %v", err)
	}
	e.reg.getErr = nil
	e.res.mountErr[layerC] = errors.New("fuse: permission denied")
	err = e.prepare("/mnt/c", criLabels(layerC))
	if err == nil || !strings.Contains(err.Error(), layerC) || !strings.Contains(err.Error(), "/mnt/c") {
		t.Errorf("mount failure: %v", err)
	}
	// A layer that failed to mount is closed.
	c := e.res.of(layerC)
	if _, closed := c[len(c)-1].state(); !closed {
		t.Error("layer that failed to mount was not closed")
	}
}

func TestCheckUnmountClose(t *testing.T) {
	e := newEnv(t, Options{})
	image := []string{layerA, layerB, layerC}
	var mountErr error
	e.fs.checkMount = func(string) error { return mountErr }
	if err := e.prepare("/mnt/a", criLabels(layerA, image...)); err != nil {
		t.Fatal(err)
	}
	if err := e.prepare("/mnt/b", criLabels(layerB, image...)); err != nil {
		t.Fatal(err)
	}
	if err := e.fs.Mount(e.ctx, "/mnt/a", criLabels(layerA)); err == nil {
		t.Error("mounted twice at one mountpoint")
	}
	if err := e.fs.Check(e.ctx, "/mnt/a/", criLabels(layerA)); err != nil {
		t.Errorf("check of a mounted layer: %v", err)
	}
	mountErr = errors.New("/mnt/a is not mounted")
	if err := e.fs.Check(e.ctx, "/mnt/a", criLabels(layerA)); err == nil || !strings.Contains(err.Error(), layerA) {
		t.Errorf("check of a layer whose mount is gone: %v", err)
	}
	mountErr = nil
	if err := e.fs.Check(e.ctx, "/mnt/x", criLabels(layerA)); err == nil {
		t.Error("check of nothing mounted passed")
	}

	if err := e.fs.Unmount(e.ctx, "/mnt/a"); err != nil {
		t.Fatal(err)
	}
	a := e.res.of(layerA)[0]
	if at, closed := a.state(); at != "" || !closed {
		t.Errorf("unmounted layer: at %q closed %v", at, closed)
	}
	if err := e.fs.Unmount(e.ctx, "/mnt/a"); err != nil {
		t.Errorf("second unmount: %v", err)
	}
	if err := e.fs.Check(e.ctx, "/mnt/a", criLabels(layerA)); err == nil {
		t.Error("check of an unmounted layer passed")
	}
	// Close ends the mounted layer and the one resolved ahead (C).
	if err := e.fs.Close(); err != nil {
		t.Fatal(err)
	}
	for _, d := range image {
		for _, l := range e.res.of(d) {
			if at, closed := l.state(); at != "" || !closed {
				t.Errorf("after Close, layer %s: at %q closed %v", d, at, closed)
			}
		}
	}
	if err := e.fs.Mount(e.ctx, "/mnt/a", criLabels(layerA)); err == nil {
		t.Error("mount after Close")
	}
	goleak.VerifyNone(t)
}

// TestCancelledWait: a prepare that gives up does not leak the resolution
// it waited for.
func TestCancelledWait(t *testing.T) {
	e := newEnv(t, Options{})
	e.res.gate = make(chan struct{})
	ctx, cancel := context.WithTimeout(e.ctx, 50*time.Millisecond)
	defer cancel()
	start := time.Now()
	if err := e.fs.Resolve(ctx, criLabels(layerA)); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Resolve: %v", err)
	}
	if err := e.fs.Mount(ctx, "/mnt/a", criLabels(layerA)); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Mount: %v", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("waits ignored cancellation: %v", d)
	}
	close(e.res.gate)
	waitFor(t, func() bool { return e.res.total() == 1 })
	if err := e.fs.Close(); err != nil {
		t.Fatal(err)
	}
	if _, closed := e.res.of(layerA)[0].state(); !closed {
		t.Error("resolution nobody took not closed by Close")
	}
	goleak.VerifyNone(t)
}

func TestIsFUSEMount(t *testing.T) {
	if err := isFUSEMount(t.TempDir()); err == nil {
		t.Error("a plain directory passed as a FUSE mount")
	}
	if err := isFUSEMount("/"); err == nil || !strings.Contains(err.Error(), "not FUSE") {
		t.Errorf("/: %v", err)
	}
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("timed out")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestParallelMountsOfOneImage: after a restart the snapshotter mounts an
// image's layers again at once, each with its stored labels; the top
// layer's mount must not close the resolutions the others wait for.
func TestParallelMountsOfOneImage(t *testing.T) {
	e := newEnv(t, Options{})
	e.res.gate = make(chan struct{})
	image := []string{layerA, layerB, layerC}
	errs := make(chan error, len(image))
	for i, d := range image {
		go func() { errs <- e.fs.Mount(e.ctx, "/mnt/"+d[7:8], criLabels(d, image[i:]...)) }()
	}
	waitFor(t, func() bool {
		e.fs.mu.Lock()
		defer e.fs.mu.Unlock()
		return len(e.fs.pending) == 3
	})
	close(e.res.gate)
	for range image {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	if n := e.res.total(); n != 3 {
		t.Errorf("%d resolutions for 3 layers, want 3", n)
	}
	for _, d := range image {
		if at, closed := e.res.of(d)[0].state(); at == "" || closed {
			t.Errorf("layer %s: mounted at %q, closed %v", d, at, closed)
		}
	}
}

func TestResolvePanicFailsLayerOnly(t *testing.T) {
	e := newEnv(t, Options{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	e.res.fail[layerA] = errPanic
	err := e.prepare("/mnt/a", criLabels(layerA))
	if err == nil || !strings.Contains(err.Error(), layerA) || !strings.Contains(err.Error(), "panic") {
		t.Errorf("resolution that panicked: %v", err)
	}
	if err := e.prepare("/mnt/b", criLabels(layerB)); err != nil {
		t.Errorf("other layer after a panic: %v", err)
	}
}
