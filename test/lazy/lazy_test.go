package lazy_test

import (
	"context"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/starling-dev/starling/internal/testenv"
	"github.com/starling-dev/starling/internal/testimage"
	"github.com/starling-dev/starling/internal/treediff"
)

const noFetchAhead = "[fs]\nprefetch = false\nbackground_fetch = false\n"

// checkRemote asserts that starlingd mounted every layer of ref lazily.
func checkRemote(t *testing.T, s *stack, ref string) {
	t.Helper()
	log := s.sd.Log()
	for _, l := range s.layers(ref) {
		if !strings.Contains(log, `msg="layer mounted lazily" layer=`+l.Digest.String()) {
			t.Errorf("layer %s did not go remote; log:\n%s", l.Digest, log)
		}
	}
	if strings.Contains(log, "falls back") {
		t.Errorf("a layer fell back:\n%s", log)
	}
}

// TestRunLazily runs an image converted by starling and one converted by
// the reference converter, ctr-remote, with ctr run --snapshotter starling.
func TestRunLazily(t *testing.T) {
	s := newStack(t, "")
	gz, esgz := s.converted("hard", must(t)(testimage.HardCases()))

	ctrRemote := strings.Replace(gz, ":gz", ":ctr-remote", 1)
	cr := func(args ...string) {
		t.Helper()
		testenv.Run(t, "ctr-remote", append([]string{"--address", s.ctd.Address}, args...)...)
	}
	cr("image", "pull", "--plain-http", gz)
	cr("image", "optimize", "--no-optimize", "--oci", gz, ctrRemote)
	cr("image", "push", "--plain-http", ctrRemote)
	// The pull must not find the layers in containerd's content store.
	cr("image", "rm", gz, ctrRemote)
	testenv.Run(t, "ctr", "--address", s.ctd.Address, "content", "prune", "references")

	for _, ref := range []string{esgz, ctrRemote} {
		out := s.pull(ref)
		if !strings.Contains(out, "4 of 4 layers lazy") {
			t.Fatalf("pull %s: %s", ref, out)
		}
		got, err := s.ctrRun(ref, "/bin/sh", "-c", "cat /etc/hostname /data/b/hl2 /opaque/new; ls /opaque; test ! -e /data/remove-me && echo whiteout-ok")
		if err != nil {
			t.Fatalf("run %s: %v\n%s", ref, err, got)
		}
		want := "upper\nlinked content\nthe only file left\nnew\nwhiteout-ok\n"
		if got != want {
			t.Fatalf("run %s: got %q, want %q", ref, got, want)
		}
		checkRemote(t, s, ref)
	}
}

// TestLazyTreeEqualsOverlay: the whole tree of the lazily mounted hard-case
// image equals what containerd's overlayfs unpacks from the original.
func TestLazyTreeEqualsOverlay(t *testing.T) {
	s := newStack(t, noFetchAhead)
	gz, esgz := s.converted("hard", must(t)(testimage.HardCases()))
	s.pull(esgz)
	ctx := context.Background()
	if out, err := s.ctd.Ctr(ctx, "image", "pull", "--plain-http", gz); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	// The overlayfs unpack of the original, as containerd does it.
	dir := t.TempDir()
	if out, err := s.ctd.Ctr(ctx, "image", "mount", gz, dir); err != nil {
		t.Fatalf("mount %s: %v\n%s", gz, err, out)
	}
	defer func() { _, _ = s.ctd.Ctr(ctx, "image", "unmount", "--rm", dir) }()
	want, err := treediff.Snapshot(dir)
	if err != nil {
		t.Fatal(err)
	}
	// The lazy image as a container sees it: a view of its top snapshot,
	// mounted the way containerd mounts it (overlay over the FUSE layers).
	top := chainID(t, s, esgz)
	if out, err := s.ctd.Ctr(ctx, "snapshot", "--snapshotter", "starling", "view", "treeview", top); err != nil {
		t.Fatalf("view: %v\n%s", err, out)
	}
	defer func() { _, _ = s.ctd.Ctr(ctx, "snapshot", "--snapshotter", "starling", "rm", "treeview") }()
	lazyDir := t.TempDir()
	out, err := s.ctd.Ctr(ctx, "snapshot", "--snapshotter", "starling", "mount", lazyDir, "treeview")
	if err != nil {
		t.Fatalf("mounts: %v\n%s", err, out)
	}
	testenv.Run(t, "sh", "-c", strings.TrimSpace(out))
	defer testenv.Run(t, "umount", lazyDir)
	got, err := treediff.Snapshot(lazyDir)
	if err != nil {
		t.Fatal(err)
	}
	if d := treediff.Diff(want, got); len(d) > 0 {
		t.Fatalf("lazy tree differs (%d):\n%s", len(d), strings.Join(d, "\n"))
	}
	if len(got) < 60 {
		t.Fatalf("only %d paths in the lazy tree", len(got))
	}
	checkRemote(t, s, esgz)
}

// TestSmallShareOfLargeLayer: reading a few small files of a 100 MB layer
// makes the registry send under 10 % of it, with prefetch and background
// fetch off.
func TestSmallShareOfLargeLayer(t *testing.T) {
	s := newStack(t, noFetchAhead)
	_, esgz := s.converted("large", must(t)(testimage.Large(100<<20, 100)))
	layers := s.layers(esgz)
	big := layers[len(layers)-1]
	s.proxy.Reset()
	s.pull(esgz)
	out, err := s.ctrRun(esgz, "/bin/sh", "-c", "cat /small/s0000 /small/s0008 /small/s0040")
	if err != nil || strings.Count(out, "small file") != 3 {
		t.Fatalf("run: %v\n%s", err, out)
	}
	sent := s.proxy.BlobBytes(big.Digest.String())
	share := float64(sent) / float64(big.Size)
	t.Logf("registry sent %d of %d bytes of the large layer (%.2f %%) in %d requests in all", sent, big.Size, 100*share, s.proxy.Requests())
	if share >= 0.10 {
		t.Fatalf("registry sent %.1f %% of the layer", 100*share)
	}
}

// TestRestart: after starlingd restarts, its remote snapshots are mounted
// again and new containers start.
func TestRestart(t *testing.T) {
	s := newStack(t, "")
	_, esgz := s.converted("hard", must(t)(testimage.HardCases()))
	s.pull(esgz)
	if out, err := s.ctrRun(esgz, "/bin/cat", "/etc/layer3"); err != nil || out != "third\n" {
		t.Fatalf("before restart: %v %q", err, out)
	}
	_ = s.sd.Cmd.Process.Signal(syscall.SIGTERM)
	testenv.WaitFor(t, 30*time.Second, "starlingd to stop", s.sd.Exited)
	s.startDaemon()
	if out, err := s.ctrRun(esgz, "/bin/sh", "-c", "cat /etc/layer3 /data/a/hl1"); err != nil || out != "third\nlinked content\n" {
		t.Fatalf("after restart: %v %q\n%s", err, out, s.sd.Log())
	}
	if !strings.Contains(s.sd.Log(), "remote snapshot mounted again") {
		t.Fatalf("no remount in the log:\n%s", s.sd.Log())
	}
}
