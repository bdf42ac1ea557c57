package snapshot

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containerd/containerd/errdefs"
	"github.com/containerd/containerd/mount"
	"github.com/containerd/containerd/namespaces"
	"github.com/containerd/containerd/pkg/snapshotters"
	"github.com/containerd/containerd/snapshots"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

const (
	layerA = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
	layerB = "sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"
	layerC = "sha256:cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc"
)

// criLabels are the labels containerd's CRI plugin (and `starling pull`)
// pass to Prepare of a layer of an eStargz image.
func criLabels(target, layer string) map[string]string {
	return map[string]string{
		"containerd.io/snapshot.ref":               target,
		snapshotters.TargetRefLabel:                "registry.test/app:1",
		snapshotters.TargetLayerDigestLabel:        layer,
		snapshotters.TargetManifestDigestLabel:     "sha256:1111111111111111111111111111111111111111111111111111111111111111",
		snapshotters.TargetImageLayersLabel:        strings.Join([]string{layerA, layerB, layerC}, ","),
		"containerd.io/snapshot/stargz/toc.digest": "sha256:2222222222222222222222222222222222222222222222222222222222222222",
		"containerd.io/gc.root":                    "x",
	}
}

// logBuffer captures the snapshotter's log.
type logBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

type env struct {
	t    *testing.T
	ctx  context.Context
	root string
	fs   FileSystem
	fake *fakeFS
	log  *logBuffer
	sn   *Snapshotter
}

func newEnv(t *testing.T, fs FileSystem, fake *fakeFS) *env {
	t.Helper()
	requireRoot(t)
	e := &env{
		t:    t,
		ctx:  namespaces.WithNamespace(context.Background(), "test"),
		root: t.TempDir(),
		fs:   fs,
		fake: fake,
		log:  &logBuffer{},
	}
	e.open()
	t.Cleanup(func() { _ = e.sn.Close() })
	return e
}

func (e *env) open() {
	e.t.Helper()
	sn, err := New(e.ctx, e.root, e.fs, slog.New(slog.NewTextHandler(e.log, &slog.HandlerOptions{Level: slog.LevelDebug})))
	if err != nil {
		e.t.Fatal(err)
	}
	e.sn = sn
}

// prepareRemote prepares layer as target on parent the way containerd's
// unpacker does, and wants ErrAlreadyExists.
func (e *env) prepareRemote(key, parent, target, layer string) {
	e.t.Helper()
	_, err := e.sn.Prepare(e.ctx, key, parent, snapshots.WithLabels(criLabels(target, layer)))
	if !errdefs.IsAlreadyExists(err) {
		e.t.Fatalf("prepare %s: want ErrAlreadyExists, got %v", target, err)
	}
}

func (e *env) mountpoint(name string) string {
	e.t.Helper()
	info, err := e.sn.Stat(e.ctx, name)
	if err != nil {
		e.t.Fatal(err)
	}
	dir := info.Labels[labelMountpoint]
	if dir == "" {
		e.t.Fatalf("%s is not a remote snapshot: %v", name, info.Labels)
	}
	return dir
}

func TestRemotePrepare(t *testing.T) {
	fake := newFakeFS()
	e := newEnv(t, fake, fake)
	before := testutil.ToFloat64(metricRemote)

	e.prepareRemote("extract-1", "", "chain-a", layerA)
	e.prepareRemote("extract-2", "chain-a", "chain-b", layerB)

	if got := testutil.ToFloat64(metricRemote) - before; got != 2 {
		t.Errorf("starling_snapshot_remote_total grew by %v, want 2", got)
	}
	for _, c := range []struct{ name, parent, layer string }{{"chain-a", "", layerA}, {"chain-b", "chain-a", layerB}} {
		info, err := e.sn.Stat(e.ctx, c.name)
		if err != nil {
			t.Fatal(err)
		}
		if info.Kind != snapshots.KindCommitted || info.Parent != c.parent {
			t.Errorf("%s: kind %v parent %q", c.name, info.Kind, info.Parent)
		}
		// containerd finds the layer by these.
		if info.Labels["containerd.io/snapshot.ref"] != c.name || info.Labels[snapshotters.TargetLayerDigestLabel] != c.layer {
			t.Errorf("%s: labels %v", c.name, info.Labels)
		}
		// Tools tell remote snapshots by this label, as for the reference.
		if info.Labels["containerd.io/snapshot/remote"] == "" {
			t.Errorf("%s: no containerd.io/snapshot/remote label: %v", c.name, info.Labels)
		}
		dir := e.mountpoint(c.name)
		if !fake.isMounted(dir) {
			t.Errorf("%s: nothing mounted at %s", c.name, dir)
		}
		if got, _ := os.ReadFile(filepath.Join(dir, marker)); string(got) != c.layer {
			t.Errorf("%s: mounted %q, want %s", c.name, got, c.layer)
		}
		// Committed before the mount: the usage walk saw an empty directory.
		u, err := e.sn.Usage(e.ctx, c.name)
		if err != nil {
			t.Fatal(err)
		}
		if u.Inodes != 1 {
			t.Errorf("%s: usage %d inodes, want 1 (committed after mounting?)", c.name, u.Inodes)
		}
	}
	// The active snapshots were consumed by the commits.
	for _, k := range []string{"extract-1", "extract-2"} {
		if _, err := e.sn.Stat(e.ctx, k); !errdefs.IsNotFound(err) {
			t.Errorf("active %s: %v, want not found", k, err)
		}
	}
	// A container on top sees both layers: its mounts are checked first.
	_, _, checks := fake.count()
	ms, err := e.sn.Prepare(e.ctx, "container", "chain-b")
	if err != nil {
		t.Fatal(err)
	}
	if _, _, c := fake.count(); c-checks != 2 {
		t.Errorf("%d checks for a container on two remote layers, want 2", c-checks)
	}
	if len(ms) != 1 || !strings.Contains(strings.Join(ms[0].Options, ","), e.mountpoint("chain-a")) {
		t.Errorf("container mounts %v do not hold the remote layer", ms)
	}
	if !strings.Contains(e.log.String(), "layer mounted lazily") {
		t.Errorf("log does not say the layer was mounted lazily:\n%s", e.log)
	}
}

func TestPrepareExistingRemote(t *testing.T) {
	fake := newFakeFS()
	e := newEnv(t, fake, fake)
	e.prepareRemote("extract-1", "", "chain-a", layerA)
	mounts, _, checks := fake.count()

	// A second pull of the same image (another namespace, or after the
	// content was pruned).
	e.prepareRemote("extract-again", "", "chain-a", layerA)
	m, _, c := fake.count()
	if m != mounts {
		t.Errorf("%d mounts after preparing an existing remote snapshot, want %d", m, mounts)
	}
	if c != checks+1 {
		t.Errorf("existing remote snapshot checked %d times, want once", c-checks)
	}
	if _, err := e.sn.Stat(e.ctx, "extract-again"); !errdefs.IsNotFound(err) {
		t.Errorf("an active snapshot was made for an existing remote one: %v", err)
	}
}

func TestPrepareExistingRemoteFailingCheck(t *testing.T) {
	fake := newFakeFS()
	e := newEnv(t, fake, fake)
	e.prepareRemote("extract-1", "", "chain-a", layerA)
	dir := e.mountpoint("chain-a")
	fake.setFailCheck(dir, errors.New("transport endpoint is not connected"))
	mounts, _, _ := fake.count()

	e.prepareRemote("extract-again", "", "chain-a", layerA)
	if m, _, _ := fake.count(); m != mounts+1 {
		t.Errorf("a remote snapshot that failed its check was not mounted again (%d mounts)", m-mounts)
	}
	if !strings.Contains(e.log.String(), "failed its check") || !strings.Contains(e.log.String(), "transport endpoint is not connected") {
		t.Errorf("failed check not logged:\n%s", e.log)
	}
}

func TestFallbackWhenMountFails(t *testing.T) {
	fake := newFakeFS()
	e := newEnv(t, fake, fake)
	fake.setFailMount(layerA, fmt.Errorf("layer %s: read TOC: unexpected EOF", layerA))
	before := testutil.ToFloat64(metricFallback.WithLabelValues("error"))

	ms, err := e.sn.Prepare(e.ctx, "extract-1", "", snapshots.WithLabels(criLabels("chain-a", layerA)))
	if err != nil {
		t.Fatalf("prepare of a layer that fails to mount: %v, want the ordinary path", err)
	}
	if len(ms) != 1 {
		t.Fatalf("mounts %v", ms)
	}
	info, err := e.sn.Stat(e.ctx, "extract-1")
	if err != nil || info.Kind != snapshots.KindActive {
		t.Fatalf("extract-1: %+v %v, want an active snapshot", info, err)
	}
	if _, err := e.sn.Stat(e.ctx, "chain-a"); !errdefs.IsNotFound(err) {
		t.Errorf("target left behind: %v", err)
	}
	if got := testutil.ToFloat64(metricFallback.WithLabelValues("error")) - before; got != 1 {
		t.Errorf("fallback metric grew by %v, want 1", got)
	}
	var lines []string
	for _, l := range strings.Split(e.log.String(), "\n") {
		if strings.Contains(l, "falls back") {
			lines = append(lines, l)
		}
	}
	if len(lines) != 1 || !strings.Contains(lines[0], "level=WARN") || !strings.Contains(lines[0], layerA) || !strings.Contains(lines[0], "unexpected EOF") {
		t.Errorf("want one warning naming layer and reason, got %q", lines)
	}
	// The ordinary path works on: containerd unpacks into it and commits.
	if err := os.WriteFile(filepath.Join(ms[0].Source, "f"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := e.sn.Commit(e.ctx, "chain-a", "extract-1"); err != nil {
		t.Fatal(err)
	}
	if _, _, checks := fake.count(); checks != 0 {
		t.Errorf("ordinary snapshots were checked %d times", checks)
	}
}

func TestFallbackWhenResolverRefuses(t *testing.T) {
	fake := newFakeFS()
	fs := &resolvingFS{fakeFS: fake, refuse: map[string]error{
		layerA: fmt.Errorf("layer %s: %w: no lazy-pull labels", layerA, ErrNotRemote),
	}}
	e := newEnv(t, fs, fake)
	before := testutil.ToFloat64(metricFallback.WithLabelValues("not-lazy"))

	if _, err := e.sn.Prepare(e.ctx, "extract-1", "", snapshots.WithLabels(criLabels("chain-a", layerA))); err != nil {
		t.Fatal(err)
	}
	if m, _, _ := fake.count(); m != 0 {
		t.Errorf("refused layer mounted %d times", m)
	}
	if got := testutil.ToFloat64(metricFallback.WithLabelValues("not-lazy")) - before; got != 1 {
		t.Errorf("not-lazy fallback metric grew by %v, want 1", got)
	}
	// Nothing but the active snapshot was made: no commit and removal.
	n := 0
	_ = e.sn.Walk(e.ctx, func(context.Context, snapshots.Info) error { n++; return nil })
	if n != 1 {
		t.Errorf("%d snapshots, want 1", n)
	}

	// An accepted layer is resolved, then mounted.
	if err := e.sn.Commit(e.ctx, "chain-a", "extract-1"); err != nil {
		t.Fatal(err)
	}
	e.prepareRemote("extract-2", "chain-a", "chain-b", layerB)
	if fmt.Sprint(fs.resolved) != fmt.Sprint([]string{layerA, layerB}) {
		t.Errorf("resolved %v", fs.resolved)
	}
}

func TestRemoveUnmounts(t *testing.T) {
	fake := newFakeFS()
	e := newEnv(t, fake, fake)
	e.prepareRemote("extract-1", "", "chain-a", layerA)
	e.prepareRemote("extract-2", "chain-a", "chain-b", layerB)
	dirA, dirB := e.mountpoint("chain-a"), e.mountpoint("chain-b")

	// A layer with children stays: containerd refuses, the layer serves on.
	if err := e.sn.Remove(e.ctx, "chain-a"); err == nil {
		t.Fatal("removed a snapshot with children")
	}
	if !fake.isMounted(dirA) {
		t.Fatal("failed removal unmounted the layer under a child")
	}
	if err := e.sn.Remove(e.ctx, "chain-b"); err != nil {
		t.Fatal(err)
	}
	if fake.isMounted(dirB) {
		t.Error("removed remote snapshot still mounted")
	}
	if err := e.sn.Remove(e.ctx, "chain-a"); err != nil {
		t.Fatal(err)
	}
	if fake.isMounted(dirA) {
		t.Error("removed remote snapshot still mounted")
	}
	// The garbage collector's cleanup removes the directories.
	if err := e.sn.Cleanup(e.ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(dirA); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("directory of a removed snapshot left after cleanup: %v", err)
	}
}

func TestCloseUnmountsAll(t *testing.T) {
	fake := newFakeFS()
	e := newEnv(t, fake, fake)
	e.prepareRemote("extract-1", "", "chain-a", layerA)
	e.prepareRemote("extract-2", "chain-a", "chain-b", layerB)
	e.prepareRemote("extract-3", "chain-b", "chain-c", layerC)
	if err := e.sn.Close(); err != nil {
		t.Fatal(err)
	}
	if m, u, _ := fake.count(); m != 3 || u != 3 {
		t.Errorf("%d mounts, %d unmounts after Close, want 3 and 3", m, u)
	}
	if err := e.sn.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
}

func TestRestartMountsAgain(t *testing.T) {
	fake := newFakeFS()
	e := newEnv(t, fake, fake)
	e.prepareRemote("extract-1", "", "chain-a", layerA)
	e.prepareRemote("extract-2", "chain-a", "chain-b", layerB)
	dirA, dirB := e.mountpoint("chain-a"), e.mountpoint("chain-b")
	if err := e.sn.Close(); err != nil {
		t.Fatal(err)
	}

	// A new daemon; the registry is down for layer B.
	fake2 := newFakeFS()
	fake2.setFailMount(layerB, errors.New("registry unreachable"))
	e.fs, e.fake = fake2, fake2
	e.open()
	if !fake2.isMounted(dirA) {
		t.Fatal("remote snapshot not mounted again after restart")
	}
	fake2.mu.Lock()
	labels := fake2.mounted[dirA]
	fake2.mu.Unlock()
	if labels[snapshotters.TargetLayerDigestLabel] != layerA || labels[snapshotters.TargetRefLabel] != "registry.test/app:1" {
		t.Errorf("mounted again with labels %v", labels)
	}
	if fake2.isMounted(dirB) {
		t.Fatal("layer B mounted though its mount fails")
	}
	if !strings.Contains(e.log.String(), "remount remote snapshot") || !strings.Contains(e.log.String(), "registry unreachable") {
		t.Errorf("failed remount not logged:\n%s", e.log)
	}
	if _, err := e.sn.Stat(e.ctx, "chain-b"); err != nil {
		t.Fatalf("snapshot of a layer that failed to mount again is gone: %v", err)
	}

	// While it fails, containers on it are refused rather than shown an
	// empty layer; once the registry is back, it is mounted on first use.
	if _, err := e.sn.View(e.ctx, "view-1", "chain-b"); !errdefs.IsUnavailable(err) {
		t.Errorf("view on an unmounted remote layer: %v, want ErrUnavailable", err)
	}
	fake2.setFailMount(layerB, nil)
	if _, err := e.sn.View(e.ctx, "view-2", "chain-b"); err != nil {
		t.Fatal(err)
	}
	if !fake2.isMounted(dirB) {
		t.Error("layer B not mounted on use after the registry came back")
	}
	// Mounts of an active snapshot on it are checked too.
	ms, err := e.sn.Mounts(e.ctx, "view-2")
	if err != nil || len(ms) != 1 {
		t.Errorf("mounts %v %v", ms, err)
	}
}

func TestRemoveWhileReading(t *testing.T) {
	fake := newFakeFS()
	fake.unmountStarted = make(chan string, 1)
	e := newEnv(t, fake, fake)
	e.prepareRemote("extract-1", "", "chain-a", layerA)
	e.prepareRemote("extract-2", "", "chain-x", layerB)
	dir := e.mountpoint("chain-a")
	endRead := fake.startRead(dir)

	removed := make(chan error, 1)
	go func() { removed <- e.sn.Remove(e.ctx, "chain-a") }()
	select {
	case <-fake.unmountStarted:
	case <-time.After(10 * time.Second):
		t.Fatal("Remove did not unmount")
	}
	// The snapshotter serves on while one layer waits for its readers.
	done := make(chan error, 1)
	go func() {
		if _, err := e.sn.Stat(e.ctx, "chain-x"); err != nil {
			done <- err
			return
		}
		if _, err := e.sn.View(e.ctx, "view", "chain-x"); err != nil {
			done <- err
			return
		}
		_, err := e.sn.Prepare(e.ctx, "extract-3", "chain-x", snapshots.WithLabels(criLabels("chain-y", layerC)))
		if !errdefs.IsAlreadyExists(err) {
			done <- fmt.Errorf("prepare during removal: %v", err)
			return
		}
		done <- nil
	}()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("snapshotter blocked while a removal waits for a read")
	}
	select {
	case err := <-removed:
		t.Fatalf("removal finished during the read: %v", err)
	default:
	}
	endRead()
	select {
	case err := <-removed:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("removal did not finish after the read")
	}
	if fake.isMounted(dir) {
		t.Error("still mounted after removal")
	}
}

// TestNoLeak mounts and removes every snapshot of an image and closes the
// snapshotter: nothing of it may run on.
func TestNoLeak(t *testing.T) {
	fake := newFakeFS()
	e := newEnv(t, fake, fake)
	e.prepareRemote("extract-1", "", "chain-a", layerA)
	e.prepareRemote("extract-2", "chain-a", "chain-b", layerB)
	e.prepareRemote("extract-3", "chain-b", "chain-c", layerC)
	for _, n := range []string{"chain-c", "chain-b", "chain-a"} {
		if err := e.sn.Remove(e.ctx, n); err != nil {
			t.Fatal(err)
		}
	}
	if err := e.sn.Close(); err != nil {
		t.Fatal(err)
	}
	if m, u, _ := fake.count(); m != u {
		t.Errorf("%d mounts, %d unmounts", m, u)
	}
	goleak.VerifyNone(t)
}

func TestFsDir(t *testing.T) {
	for _, c := range []struct {
		ms   []mount.Mount
		want string
	}{
		{[]mount.Mount{{Type: "bind", Source: "/s/1/fs"}}, "/s/1/fs"},
		{[]mount.Mount{{Type: "overlay", Options: []string{"index=off", "workdir=/s/2/work", "upperdir=/s/2/fs", "lowerdir=/s/1/fs"}}}, "/s/2/fs"},
	} {
		got, err := fsDir(c.ms)
		if err != nil || got != c.want {
			t.Errorf("fsDir(%v) = %q, %v; want %q", c.ms, got, err, c.want)
		}
	}
	if _, err := fsDir(nil); err == nil {
		t.Error("no mounts accepted")
	}
}
