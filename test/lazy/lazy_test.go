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
// image, converted to eStargz and to zstd:chunked, equals strictly what
// containerd's overlayfs unpacks from the original: every mode bit, owner,
// size, content, link target, xattr, device number, link count, hardlink
// group and mtime (see treediff). Both sides are compared as a container
// sees them, an overlay mount of the image's snapshots. The layer whose
// names a TOC cannot hold (not UTF-8) stays gzip and is unpacked, the other
// four mount lazily.
func TestLazyTreeEqualsOverlay(t *testing.T) {
	s := newStack(t, noFetchAhead)
	gz := s.push("meta:gz", must(t)(testimage.HardCasesWithNonUTF8()))
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
	checkHardCases(t, want)

	gzLayers := s.layers(gz)
	nonUTF8 := gzLayers[len(gzLayers)-1].Digest.String()
	for _, f := range []struct{ tag, flag string }{{"esgz", ""}, {"zstd", "--zstdchunked"}} {
		ref := s.proxy.Addr + "/meta:" + f.tag
		args := []string{"convert", gz, ref}
		if f.flag != "" {
			args = append(args, f.flag)
		}
		out := s.run(args...)
		if !strings.Contains(out, "it will not mount lazily") || !strings.Contains(out, nonUTF8) || !strings.Contains(out, "latin1-caf") {
			t.Errorf("%s: convert gave no warning naming layer %s and its entry:\n%s", f.tag, nonUTF8, out)
		}
		if out := s.pull(ref); !strings.Contains(out, "4 of 5 layers lazy") {
			t.Errorf("%s: pull: %s", f.tag, out)
		}
		got := lazyView(t, s, ref, "view-"+f.tag)
		if d := treediff.Diff(want, got); len(d) > 0 {
			t.Errorf("%s: lazy tree differs from overlayfs (%d, first the overlayfs value):\n%s", f.tag, len(d), strings.Join(d, "\n"))
		}
		checkRemoteExcept(t, s, ref, nonUTF8)
	}
}

// lazyView records the tree of ref's top snapshot in the starling
// snapshotter as a container sees it: a view mounted the way containerd
// mounts it (overlay over the FUSE layers and the unpacked ones).
func lazyView(t *testing.T, s *stack, ref, name string) treediff.Tree {
	t.Helper()
	ctx := context.Background()
	top := chainID(t, s, ref)
	dir := t.TempDir()
	// ctr holds the view under a lease of its own that ends with the
	// command, so the view is mounted from what creating it prints, before
	// containerd's GC can take it.
	out, err := s.ctd.Ctr(ctx, "snapshot", "--snapshotter", "starling", "view", "--target", dir, name, top)
	if err != nil {
		t.Fatalf("view: %v\n%s", err, out)
	}
	defer func() { _, _ = s.ctd.Ctr(ctx, "snapshot", "--snapshotter", "starling", "rm", name) }()
	testenv.Run(t, "sh", "-c", strings.TrimSpace(out))
	defer testenv.Run(t, "umount", dir)
	tree, err := treediff.Snapshot(dir)
	if err != nil {
		t.Fatal(err)
	}
	return tree
}

// checkRemoteExcept asserts that every layer of ref but notLazy mounted
// lazily, and that notLazy went the ordinary way, with a warning naming it.
func checkRemoteExcept(t *testing.T, s *stack, ref, notLazy string) {
	t.Helper()
	log := s.sd.Log()
	for _, l := range s.layers(ref) {
		d := l.Digest.String()
		lazy := strings.Contains(log, `msg="layer mounted lazily" layer=`+d)
		switch {
		case d == notLazy && lazy:
			t.Errorf("layer %s, whose names a TOC cannot hold, mounted lazily", d)
		case d == notLazy && !strings.Contains(log, `msg="layer falls back to download and unpack" layer=`+d):
			t.Errorf("layer %s: no fallback in the log:\n%s", d, log)
		case d != notLazy && !lazy:
			t.Errorf("layer %s did not go remote; log:\n%s", d, log)
		}
	}
}

// checkHardCases asserts that the reference tree holds the hard cases, so
// that equality means something, and logs what containerd made of the
// entries whose unpacking is debatable.
func checkHardCases(t *testing.T, tree treediff.Tree) {
	t.Helper()
	checks := map[string]func(treediff.Node) bool{
		"modes/f00-0000":                    func(n treediff.Node) bool { return n.Type == "file" && n.Mode == 0 },
		"modes/d01-4755":                    func(n treediff.Node) bool { return n.Type == "dir" && n.Mode == 0o4755 },
		"modes/f08-7777":                    func(n treediff.Node) bool { return n.Mode == 0o7777 },
		"owners/file-4294967294":            func(n treediff.Node) bool { return n.UID == 4294967294 },
		"owners/dir-4294967294":             func(n treediff.Node) bool { return n.GID == 4294967294 },
		"devs/max":                          func(n treediff.Node) bool { return n.Type == "block" && n.Rdev == "4095:1048575" },
		"devs/big-minor":                    func(n treediff.Node) bool { return n.Type == "char" && n.Rdev == "254:70000" },
		"links/b/fifo-link":                 func(n treediff.Node) bool { return n.Type == "fifo" && n.LinkSet == "links/a/fifo|links/b/fifo-link" },
		"links/a/group":                     func(n treediff.Node) bool { return n.LinkSet == "links/a/group|links/group3" },
		"xattrs/cap":                        func(n treediff.Node) bool { return n.Xattrs["security.capability"] != "" },
		"xattrs/many":                       func(n treediff.Node) bool { return len(n.Xattrs) == 12 },
		"xattrs/binary":                     func(n treediff.Node) bool { return n.Xattrs["user.bin"] == "000102fffe80000a" },
		"xattrs":                            func(n treediff.Node) bool { return n.Xattrs["trusted.dir"] == "" && n.Xattrs["user.dir"] != "" },
		"times/file-y2100":                  func(n treediff.Node) bool { return n.Mtime == 4107542399 },
		"times/link-y2038":                  func(n treediff.Node) bool { return n.Mtime == 1<<31 },
		"sizes/large":                       func(n treediff.Node) bool { return n.Size == 20<<20+4097 },
		"sizes/sparse":                      func(n treediff.Node) bool { return n.Size == 24<<20 },
		"names/new\nline":                   func(n treediff.Node) bool { return n.Type == "file" },
		"names/" + strings.Repeat("n", 255): func(n treediff.Node) bool { return n.Type == "file" },
		"nonutf8/latin1-caf\xe9":            func(n treediff.Node) bool { return n.Type == "file" },
		"nonutf8/link-to-bad":               func(n treediff.Node) bool { return n.Link == "bad-\xff\xfe-bytes" },
		"replace/dir-then-file":             func(n treediff.Node) bool { return n.Type == "file" },
		"replace/file-then-dir":             func(n treediff.Node) bool { return n.Type == "dir" && n.Mode == 0o2750 },
		"replace/opaque/lowerdir":           func(n treediff.Node) bool { return n.Type == "fifo" },
		"forged/opaque/lower":               func(n treediff.Node) bool { return n.Type == "file" },
		"forged/xwhiteout/victim":           func(n treediff.Node) bool { return n.Type == "file" && n.Size == int64(len("upper victim\n")) },
		"forged/xwhiteout/other":            func(n treediff.Node) bool { return n.Type == "file" },
		"xattrs/trusted-kept":               func(n treediff.Node) bool { return n.Xattrs["trusted.starling"] == "" && n.Xattrs["user.kept"] != "" },
	}
	for p, check := range checks {
		if n, ok := tree[p]; !ok || !check(n) {
			t.Errorf("reference tree: %q is %+v (present %v)", p, n, ok)
		}
	}
	for _, gone := range []string{"links/b/group2", "xattrs/trusted", "replace/opaque/lower", "data/remove-me", "opaque/old"} {
		if _, ok := tree[gone]; ok {
			t.Errorf("reference tree: %q is not whited out", gone)
		}
	}
	deepest := ""
	for p := range tree {
		if len(p) > len(deepest) {
			deepest = p
		}
	}
	if len(deepest) < 3900 {
		t.Errorf("reference tree: deepest path is %d bytes", len(deepest))
	}
	for _, p := range []string{"links/a/suid", "links/b/suid-link", "links/a/cap", "times/file-before1970", "times/file-minus1", "times/file-unix0", "sizes/empty-suid", "xattrs/acl-file", "xattrs/acl-dir", "xattrs/user-symlink", "xattrs/security-other"} {
		n := tree[p]
		t.Logf("reference %s: mode %#o owner %d:%d mtime %d xattrs %v nlink %d", p, uint32(n.Mode), n.UID, n.GID, n.Mtime, n.Xattrs, n.Nlink)
	}
	t.Logf("reference tree: %d paths, deepest %d bytes", len(tree), len(deepest))
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
